#!/bin/bash
# Capture benchmark: si against rsync (SystemImager's transport), tar|zstd and restic, on the
# `big` Debian tree, over loopback only. See bench/README.md.
#
#   bench/capture.sh [--repeat N] [--workdir DIR] [--keep] [--results FILE] [BINDIR]
#
#   BINDIR     directory with si-prepareclient, si-getimage and si-image (default
#              target/release); si is skipped, with a message, when they are missing
#   --repeat   run every scenario N times and print medians (default 1)
#   --workdir  where the tree, stores and destinations go (default /var/tmp; use a disk, or
#              a tmpfs to take the disk out of the figures)
#   --keep     keep the work directory
#   --results  also write the raw measurements (TSV) to FILE
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
repeat=1
workbase=/var/tmp
keep=0
results_copy=
bindir=target/release
while [ $# -gt 0 ]; do
    case $1 in
    --repeat) repeat=$2; shift 2 ;;
    --workdir) workbase=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --results) results_copy=$2; shift 2 ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "$0: unknown option $1" >&2; exit 2 ;;
    *) bindir=$1; shift ;;
    esac
done
[[ $repeat =~ ^[1-9][0-9]*$ ]] || { echo "$0: --repeat needs a positive number" >&2; exit 2; }
if [[ $bindir != /* ]] && [ ! -d "$bindir" ] && [ -d "$repo/$bindir" ]; then
    bindir=$repo/$bindir
fi

[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (the tree has device nodes and many owners)" >&2; exit 1; }
for tool in rsync tar zstd restic python3 ss; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing (see bench/README.md)" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "$0: /usr/bin/time is missing: apt-get install time" >&2; exit 1; }

si=1
for b in si-prepareclient si-getimage si-image; do
    if [ ! -x "$bindir/$b" ]; then
        echo "capture.sh: si skipped: $bindir/$b not found (cargo build --release --workspace --bins)" >&2
        si=0
        break
    fi
done

work=$(mktemp -d "$workbase/si-bench.XXXXXX")
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    if [ "$keep" -eq 1 ]; then
        echo "capture.sh: work directory kept: $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
results=$work/results.tsv
: >"$results"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Helpers.

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until something listens on 127.0.0.1:$1, without connecting (the si client serves a
# single capture); fails if process $2 exits first.
wait_listen() {
    local port=$1 pid=$2 i
    for ((i = 0; i < 600; i++)); do
        if [ -n "$(ss -Hltn "src 127.0.0.1:$port")" ]; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { echo "capture.sh: server exited before listening on $port" >&2; return 1; }
        sleep 0.1
    done
    echo "capture.sh: nothing listens on 127.0.0.1:$port after 60 s" >&2
    return 1
}

# Runs a command under /usr/bin/time into the file $1: "wall user sys maxrss_kb".
timed() {
    local out=$1
    shift
    /usr/bin/time -f '%e %U %S %M' -o "$out" "$@"
}

# Fields of a timed() file: wall, cpu (user+sys), rss (KiB).
read_time() {
    # The last line: GNU time writes "Command exited with non-zero status" lines before it.
    tail -n 1 "$1"
}

du_bytes() { du -sb "$1" | cut -f1; }

record() { # rep scenario tool wall cpu wire store rss_kb
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$results"
}

# ---------------------------------------------------------------------------------------------
# The tools. Each captures $src for scenario $2 of repetition $1 and records one line.

layout=$repo/images/layouts/bios-msdos.toml
token=bench-$RANDOM$RANDOM

capture_si() {
    local rep=$1 scenario=$2 port cpid wall ucpu scpu rss mwall mu ms mrss wire store
    port=$(free_port)
    timed "$work/t.si-client" "$bindir/si-prepareclient" --root "$src" --listen "127.0.0.1:$port" \
        --master 127.0.0.1 --token "$token" --layout "$layout" --state-dir "$work/si-state" \
        --timeout 600 >"$work/si-client.log" 2>&1 &
    cpid=$!
    pids+=("$cpid")
    wait_listen "$port" "$cpid" || { cat "$work/si-client.log" >&2; return 1; }
    if ! timed "$work/t.si-master" "$bindir/si-getimage" --golden-client "127.0.0.1:$port" \
        --token "$token" --image bench --store "$work/si-store" \
        --summary-json "$work/si-summary.json" >"$work/si-master.log" 2>&1; then
        cat "$work/si-master.log" "$work/si-client.log" >&2
        return 1
    fi
    wait "$cpid" || { echo "capture.sh: si-prepareclient failed:" >&2; cat "$work/si-client.log" >&2; return 1; }
    read -r wall ucpu scpu rss < <(read_time "$work/t.si-client")
    read -r mwall mu ms mrss < <(read_time "$work/t.si-master")
    wire=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["bytes_sent"])' "$work/si-summary.json")
    store=$("$bindir/si-image" --store "$work/si-store" du | grep -Eo '[0-9]+' | head -n 1)
    record "$rep" "$scenario" si "$mwall" "$(echo "$ucpu + $scpu + $mu + $ms" | bc)" "$wire" "$store" "$mrss"
}

capture_rsync() {
    local rep=$1 scenario=$2 port dpid wall u s rss du_ ds sent received
    port=$(free_port)
    cat >"$work/rsyncd.conf" <<EOF
port = $port
address = 127.0.0.1
pid file = $work/rsyncd.pid
use chroot = yes
[root]
    path = $src
    read only = yes
    uid = 0
    gid = 0
    numeric ids = yes
    hosts allow = 127.0.0.1
EOF
    rm -f "$work/rsyncd.pid"
    timed "$work/t.rsyncd" rsync --daemon --no-detach --config="$work/rsyncd.conf" \
        --log-file="$work/rsyncd.log" &
    dpid=$!
    pids+=("$dpid")
    wait_listen "$port" "$dpid"
    mkdir -p "$work/rsync-dst"
    timed "$work/t.rsync" rsync -aHAXS --numeric-ids --delete --stats \
        "rsync://127.0.0.1:$port/root/" "$work/rsync-dst/" >"$work/rsync.stats" 2>&1 ||
        { cat "$work/rsync.stats" >&2; return 1; }
    kill -TERM "$(cat "$work/rsyncd.pid")"
    wait "$dpid" || true # the daemon ends on SIGTERM
    read -r wall u s rss < <(read_time "$work/t.rsync")
    read -r _ du_ ds _ < <(read_time "$work/t.rsyncd")
    sent=$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' "$work/rsync.stats" | tr -d ,)
    received=$(sed -n 's/^Total bytes received: \([0-9,]*\).*/\1/p' "$work/rsync.stats" | tr -d ,)
    if [ -z "$sent" ] || [ -z "$received" ]; then
        echo "capture.sh: no totals in rsync --stats" >&2
        cat "$work/rsync.stats" >&2
        return 1
    fi
    record "$rep" "$scenario" rsync "$wall" "$(echo "$u + $s + $du_ + $ds" | bc)" \
        "$((sent + received))" "$(du_bytes "$work/rsync-dst")" "$rss"
}

capture_tar() {
    local rep=$1 scenario=$2 out wall u s rss
    mkdir -p "$work/tar"
    out=$work/tar/$rep-$scenario.tar.zst
    # shellcheck disable=SC2016 # expanded by the inner bash
    timed "$work/t.tar" bash -c 'set -o pipefail; tar -C "$1" --sparse --xattrs --acls \
        --xattrs-include="*" --numeric-owner -cf - . | zstd -q -T0 -3 >"$2"' _ "$src" "$out"
    read -r wall u s rss < <(read_time "$work/t.tar")
    record "$rep" "$scenario" "tar|zstd" "$wall" "$(echo "$u + $s" | bc)" \
        "$(stat -c %s "$out")" "$(du_bytes "$work/tar")" "$rss"
}

capture_restic() {
    local rep=$1 scenario=$2 before after wall u s rss
    before=$(du_bytes "$work/restic")
    timed "$work/t.restic" restic -r "$work/restic" backup --quiet --host si-bench "$src" \
        >"$work/restic.log" 2>&1 || { cat "$work/restic.log" >&2; return 1; }
    after=$(du_bytes "$work/restic")
    read -r wall u s rss < <(read_time "$work/t.restic")
    record "$rep" "$scenario" restic "$wall" "$(echo "$u + $s" | bc)" "$((after - before))" "$after" "$rss"
}

capture_all() {
    local rep=$1 scenario=$2 t
    for t in si rsync tar restic; do
        if [ "$t" = si ] && [ "$si" -eq 0 ]; then continue; fi
        log "rep $rep, $scenario capture: $t"
        sync # no writeback of the previous step during this one
        "capture_$t" "$rep" "$scenario"
    done
}

# ---------------------------------------------------------------------------------------------
command -v bc >/dev/null || { echo "$0: bc is missing: apt-get install bc" >&2; exit 1; }
export RESTIC_PASSWORD=si-bench RESTIC_CACHE_DIR=$work/restic-cache

src=$work/src
changed_raw=0
for ((rep = 1; rep <= repeat; rep++)); do
    # A fresh tree for every repetition: the changed scenario modifies it.
    rm -rf "$src"
    log "rep $rep: extracting the big tree into $src"
    "$repo/tests/fixtures/rootfs.sh" "$src" big
    tree_files=$(find "$src" | wc -l)
    tree_bytes=$(du_bytes "$src")
    log "rep $rep: warming the page cache ($tree_files paths, $tree_bytes bytes)"
    find "$src" -type f -print0 | xargs -0 cat >/dev/null

    rm -rf "$work/si-store" "$work/si-state" "$work/rsync-dst" "$work/tar" "$work/restic" "$work/restic-cache"
    mkdir -p "$work/si-state"
    restic init --repository-version 2 -r "$work/restic" >"$work/restic.log" 2>&1 ||
        { cat "$work/restic.log" >&2; exit 1; }

    capture_all "$rep" first
    capture_all "$rep" unchanged

    log "rep $rep: replacing 20 files with ~50 MB of new random content"
    python3 "$repo/bench/mutate.py" "$src" --count 20 --bytes $((50 * 1024 * 1024)) --seed 1 \
        >"$work/changed.list"
    changed_raw=$(xargs -0 cat <"$work/changed.list" | wc -c)
    changed_zstd=$(xargs -0 cat <"$work/changed.list" | zstd -q -T0 -3 -c | wc -c)
    record "$rep" changed "changed-content" 0 0 "$changed_zstd" "$changed_raw" 0
    capture_all "$rep" changed
done

# ---------------------------------------------------------------------------------------------
python3 - "$results" "$tree_files" "$tree_bytes" "$repeat" "$si" <<'EOF'
import statistics, sys
results, files, tree_bytes, repeat, si = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
rows = {}
for line in open(results):
    rep, scen, tool, wall, cpu, wire, store, rss = line.rstrip("\n").split("\t")
    rows.setdefault((scen, tool), []).append((float(wall), float(cpu), int(wire), int(store), int(rss)))
med = {k: [statistics.median(col) for col in zip(*v)] for k, v in rows.items()}
M = 1e6
print()
print(f"capture benchmark: big tree, {files} paths, {tree_bytes / M:.0f} MB; loopback; "
      f"{'median of ' + str(repeat) + ' runs' if repeat > 1 else '1 run'}" + ("" if si else "; si skipped (binaries missing)"))
cc = med.get(("changed", "changed-content"))
if cc:
    print(f"changed content: 20 files, {cc[3] / M:.1f} MB raw, {cc[2] / M:.1f} MB as zstd -3 (Δzstd)")
print()
hdr = f"{'scenario':<10} {'tool':<9} {'wall s':>8} {'cpu s':>8} {'wire MB':>9} {'store MB':>9} {'rss MB':>7} {'wire/tar':>9} {'wire/rsync':>10} {'wire/Δzstd':>10} {'wall/rsync':>10}"
print(hdr)
print("-" * len(hdr))
def ratio(a, b):
    return f"{a / b:.3f}" if b else "-"
for scen in ("first", "unchanged", "changed"):
    for tool in ("si", "rsync", "tar|zstd", "restic"):
        m = med.get((scen, tool))
        if not m:
            continue
        wall, cpu, wire, store, rss = m
        tar = med.get((scen, "tar|zstd"))
        rs = med.get((scen, "rsync"))
        print(f"{scen:<10} {tool:<9} {wall:8.1f} {cpu:8.1f} {wire / M:9.1f} {store / M:9.1f} {rss / 1024:7.0f} "
              f"{ratio(wire, tar[2]) if tar else '-':>9} {ratio(wire, rs[2]) if rs else '-':>10} "
              f"{ratio(wire, cc[2]) if cc and scen == 'changed' else '-':>10} {ratio(wall, rs[0]) if rs else '-':>10}")
EOF
if [ -n "$results_copy" ]; then
    cp "$results" "$results_copy"
fi
