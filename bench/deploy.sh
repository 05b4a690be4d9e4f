#!/bin/bash
# Deploy and update benchmark: si against rsync from an rsync daemon (SystemImager's install and
# update transport), on the `big` Debian tree, between two network namespaces joined by a veth
# link shaped with tc to 1 Gbit/s. See bench/README.md.
#
#   bench/deploy.sh [--repeat N] [--workdir DIR] [--rate RATE] [--keep] [BINDIR]
#
#   BINDIR     directory with si-image, si-server and si-updateclient (default target/release)
#   --repeat   run every scenario N times and print medians (default 1)
#   --workdir  where the trees and stores go (default /var/tmp)
#   --rate     link rate for tc (default 1gbit)
#   --insecure si without TLS (plain TCP on both sides); the default is TLS with the CA pinned.
#   --compare-tls  si both ways in one run, side by side: `si` (TLS, the node enrolled) and
#              `si-plain` (a second si-server on the same store and state under --insecure), in
#              alternating order each rep, so both see the same machine; prints what TLS costs
#              in wall and node CPU per scenario (the target: at most 10 %). Skips the 1 GiB file.
#              Use an even --repeat: each order then runs as often.
#   --quick    only the disk deploy (once) and the update scenario (the update runs --repeat times,
#              each rep a new version with other files changed)
#
# Scenarios, each for si and rsync:
#   deploy-disk   fresh deploy to an empty directory on disk
#   deploy-tmpfs  fresh deploy to an empty tmpfs (the disk out of the figure)
#   update        20 files changed (~50 MB), 5 added, 5 deleted (rsync -aHAXS --delete)
#   1g-file       1 MiB changed inside a 1 GiB file
# Columns (medians): wall s, CPU s of the node side (and of the serving side), bytes on the wire
# (si: received by the node; rsync: its --stats totals), node peak RSS.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
repeat=1
workbase=/var/tmp
rate=1gbit
keep=0
quick=0
insecure=0
compare=0
bindir=$repo/target/release
while [ $# -gt 0 ]; do
    case $1 in
    --repeat) repeat=$2; shift 2 ;;
    --workdir) workbase=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --quick) quick=1; shift ;;
    --insecure) insecure=1; shift ;;
    --compare-tls) compare=1; shift ;;
    -h | --help) sed -n '2,29p' "$0"; exit 0 ;;
    -*) echo "$0: unknown option $1" >&2; exit 2 ;;
    *) bindir=$1; shift ;;
    esac
done
[ "$compare" = 1 ] && [ "$insecure" = 1 ] && { echo "$0: --compare-tls runs both; drop --insecure" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (namespaces, tc, device nodes)" >&2; exit 1; }
for b in si-image si-server si-updateclient si-node si-enroll; do
    [ -x "$bindir/$b" ] || { echo "$0: $bindir/$b missing: cargo build --release --workspace --bins" >&2; exit 1; }
done
for tool in rsync tc python3 zstd; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "$0: /usr/bin/time is missing: apt-get install time" >&2; exit 1; }

ns_m=si-bench$$-m
ns_n=si-bench$$-n
work=$(mktemp -d "$workbase/si-bench-deploy.XXXXXX")
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for ns in "$ns_m" "$ns_n"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
    sleep 0.2
    umount "$work/tmpfs" 2>/dev/null || true
    ip netns del "$ns_m" 2>/dev/null || true
    ip netns del "$ns_n" 2>/dev/null || true
    if [ "$keep" -eq 0 ]; then rm -rf --one-file-system "$work"; else echo "kept $work" >&2; fi
}
trap cleanup EXIT
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
results=$work/results.tsv
: >"$results"
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$results"; } # rep scenario tool wall cpu wire rss

# Leftover namespaces of dead runs.
for ns in $(ip netns list | awk '{print $1}' | grep "^si-bench" || true); do
    pid=${ns#si-bench}; pid=${pid%%-*}
    [ -d "/proc/$pid" ] || ip netns del "$ns" 2>/dev/null || true
done

ip netns add "$ns_m"
ip netns add "$ns_n"
ip link add "sb$$m" netns "$ns_m" type veth peer name "sb$$n" netns "$ns_n"
ip -n "$ns_m" addr add 10.213.200.1/24 dev "sb$$m"
ip -n "$ns_n" addr add 10.213.200.2/24 dev "sb$$n"
for ns in "$ns_m" "$ns_n"; do ip -n "$ns" link set lo up; done
ip -n "$ns_m" link set "sb$$m" up
ip -n "$ns_n" link set "sb$$n" up
ip netns exec "$ns_m" tc qdisc add dev "sb$$m" root tbf rate "$rate" burst 256kb latency 50ms
ip netns exec "$ns_n" tc qdisc add dev "sb$$n" root tbf rate "$rate" burst 256kb latency 50ms
M=10.213.200.1

log "building the golden tree"
src=$work/golden
bash "$repo/tests/fixtures/rootfs.sh" "$src" big >/dev/null
find "$src" -type f -exec cat {} + >/dev/null 2>&1 || true
store=$work/store
"$bindir/si-image" --store "$store" commit "$src" bench >/dev/null 2>&1

# The master's services.
if [ "$insecure" = 1 ]; then
    tls_server=(--insecure); tls_client=(--insecure)
    log "TLS off (--insecure on both sides)"
else
    pin=$("$bindir/si-server" --state-dir "$work/state" ca show | sed -n 's/^fingerprint: *//p')
    tls_server=(); tls_client=(--ca-fingerprint "$pin")
    log "TLS on, CA $pin"
fi
/usr/bin/time -f '%e %U %S %M' -o "$work/t.server" ip netns exec "$ns_m" "$bindir/si-server" --store "$store" --state-dir "$work/state" --listen 0.0.0.0:7811 "${tls_server[@]}" 2>"$work/server.log" &
pids+=($!)
cat >"$work/rsyncd.conf" <<CONF
port = 873
pid file = $work/rsyncd.pid
use chroot = yes
[img]
    path = $src
    read only = yes
    uid = 0
    gid = 0
    numeric ids = yes
CONF
ip netns exec "$ns_m" rsync --daemon --no-detach --config="$work/rsyncd.conf" &
pids+=($!)
wait_port() { # port log: until the master's service accepts there (at most 20 s)
    local i
    for ((i = 0; i < 200; i++)); do
        ip netns exec "$ns_m" bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$0: nothing listens on port $1:" >&2; cat "$2" >&2; exit 1
}
wait_port 7811 "$work/server.log"
wait_port 873 /dev/null
if [ "$compare" = 1 ]; then
    # The same store and state, without TLS, on another port: the si-plain rows.
    ip netns exec "$ns_m" "$bindir/si-server" --store "$store" --state-dir "$work/state" --listen 0.0.0.0:7813 --insecure 2>"$work/server-plain.log" &
    pids+=($!)
    wait_port 7813 "$work/server-plain.log"
fi
if [ "$insecure" = 0 ]; then
    # The node enrolls once, as its installer would: armed in the inventory, the master's
    # one-time token, a key and certificate of its own; its updates then present it.
    "$bindir/si-node" --state-dir "$work/state" --images bench add bench-node \
        --mac 52:54:00:be:00:01 --image bench --boot install >/dev/null 2>&1
    token=$("$bindir/si-server" --state-dir "$work/state" ca token bench-node)
    SI_ENROLL_TOKEN=$token ip netns exec "$ns_n" "$bindir/si-enroll" --server "$M:7811" \
        --ca-fingerprint "$pin" --node bench-node --mac 52:54:00:be:00:01 --uuid bench-node \
        --identity-dir "$work/node.id" >/dev/null
    tls_client+=(--identity-dir "$work/node.id")
    log "node enrolled"
fi

ncpu() { # CPU seconds of a process tree so far: utime+stime of everything in a namespace
    ip netns pids "$1" | while read -r p; do awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || true; done |
        awk -v hz="$(getconf CLK_TCK)" '{s+=$1} END {printf "%.2f", s/hz}'
}

si_pull() { # rep scenario dest [extra...]: as `si` (the default transport), or `si-plain` when
    # SI_AS=plain (the --insecure server of --compare-tls)
    local rep=$1 sc=$2 dest=$3; shift 3
    local before after tool=si client=("${tls_client[@]}") server=$M
    if [ "${SI_AS:-}" = plain ]; then tool=si-plain; client=(--insecure); server=$M:7813; fi
    before=$(ncpu "$ns_m")
    /usr/bin/time -f '%e %U %S %M' -o "$work/t.si" ip netns exec "$ns_n" "$bindir/si-updateclient" \
        --server "$server" --image bench --root "$dest" --state-dir "$dest.state" --no-default-excludes \
        --summary-json "$work/si.json" "${client[@]}" "$@" >/dev/null 2>"$work/si.log" || { cat "$work/si.log" >&2; return 1; }
    after=$(ncpu "$ns_m")
    read -r wall u s rss <"$work/t.si"
    wire=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["wire_bytes"])' "$work/si.json")
    record "$rep" "$sc" "$tool" "$wall" "$(echo "$u + $s" | bc) (+$(echo "$after - $before" | bc))" "$wire" "$rss"
}

si_pulls() { # rep scenario dest [extra...]: si, and under --compare-tls also si-plain (into
    # DEST-plain), the two in alternating order each rep, `between` run before each (the same
    # caches and free memory for both: whichever went first would otherwise pay for reclaim)
    local rep=$1 sc=$2 dest=$3; shift 3
    if [ "$compare" = 0 ]; then si_pull "$rep" "$sc" "$dest" "$@"; return; fi
    if [ $((rep % 2)) = 1 ]; then
        between; si_pull "$rep" "$sc" "$dest" "$@"
        between; SI_AS=plain si_pull "$rep" "$sc" "$dest-plain" "$@"
    else
        between; SI_AS=plain si_pull "$rep" "$sc" "$dest-plain" "$@"
        between; si_pull "$rep" "$sc" "$dest" "$@"
    fi
}

rsync_pull() { # rep scenario dest [extra...]
    local rep=$1 sc=$2 dest=$3; shift 3
    mkdir -p "$dest"
    /usr/bin/time -f '%e %U %S %M' -o "$work/t.rs" ip netns exec "$ns_n" rsync -aHAXS --numeric-ids --stats "$@" \
        "rsync://$M/img/" "$dest/" >"$work/rs.stats" 2>&1 || { cat "$work/rs.stats" >&2; return 1; }
    read -r wall u s rss <"$work/t.rs"
    sent=$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' "$work/rs.stats" | tr -d ,)
    recv=$(sed -n 's/^Total bytes received: \([0-9,]*\).*/\1/p' "$work/rs.stats" | tr -d ,)
    record "$rep" "$sc" rsync "$wall" "$(echo "$u + $s" | bc)" "$((sent + recv))" "$rss"
}

mkdir -p "$work/tmpfs"
mount -t tmpfs -o size=4g tmpfs "$work/tmpfs"
changed_bytes=0
deploy_reps=$repeat
# One fresh deploy is enough for --quick, not for a comparison.
[ "$quick" -eq 1 ] && [ "$compare" -eq 0 ] && deploy_reps=1
for ((rep = 1; rep <= deploy_reps; rep++)); do
    log "rep $rep: fresh deploys"
    rm -rf --one-file-system "$work/si-disk" "$work/si-disk.state" "$work/si-disk-plain" "$work/si-disk-plain.state" \
        "$work/rs-disk" "$work"/tmpfs/*
    between() { sync; echo 3 >/proc/sys/vm/drop_caches; }
    between
    si_pulls "$rep" deploy-disk "$work/si-disk"
    between
    rsync_pull "$rep" deploy-disk "$work/rs-disk"
    [ "$quick" -eq 1 ] && continue
    between() { rm -rf "$work"/tmpfs/si*; sync; echo 3 >/proc/sys/vm/drop_caches; }
    si_pulls "$rep" deploy-tmpfs "$work/tmpfs/si"
    between
    rsync_pull "$rep" deploy-tmpfs "$work/tmpfs/rs"
    rm -rf "$work/tmpfs/rs"
done

# Each rep: a new version with 20 other files changed, 5 added, 5 deleted; every node follows.
: >"$work/changed_z"
between() { :; }
for ((rep = 1; rep <= repeat; rep++)); do
    log "rep $rep: update: 20 changed, 5 added, 5 deleted"
    python3 "$repo/bench/mutate.py" "$src" --count 20 --seed $((6 + rep)) >"$work/changed.lst"
    for i in 1 2 3 4 5; do head -c $((200 * 1024 * i)) /dev/urandom >"$src/usr/share/bench-added-$rep-$i"; done
    mapfile -t docs < <(find "$src/usr/share/doc" -type f -size +4k | sort)
    rm -f "${docs[@]:0:5}"
    (tr '\0' '\n' <"$work/changed.lst"; ls "$src"/usr/share/bench-added-$rep-*) | xargs cat | zstd -3 -c | wc -c >>"$work/changed_z"
    "$bindir/si-image" --store "$store" commit "$src" bench >/dev/null 2>&1
    sleep 2.5 # the server notices the new version (it looks every 2 s)
    # The node trees warm in the page cache, as on a running node (the si tree was written
    # before the caches were dropped for rsync's deploy).
    find "$work"/si-disk* "$work/rs-disk" -printf '' 2>/dev/null
    si_pulls "$rep" update "$work/si-disk"
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print("  si phases: " + " ".join(f"{k}={j[k]:.3f}" for k in j if k.endswith("seconds")))' "$work/si.json" >&2
    rsync_pull "$rep" update "$work/rs-disk" --delete
done
{ [ "$quick" -eq 1 ] || [ "$compare" -eq 1 ]; } && skip1g=1 || skip1g=0

if [ "$skip1g" -eq 0 ]; then
log "1 MiB changed inside a 1 GiB file"
rm -rf "$src.1g" && mkdir -p "$src.1g"
head -c 1G /dev/urandom >"$src.1g/big"
"$bindir/si-image" --store "$store" commit "$src.1g" bench >/dev/null 2>&1
rm -rf "$work/si-disk.state" # a fresh node record: deploy the 1 GiB image into a new root
si_pull 1 1g-deploy "$work/si-1g" --force
head -c 1M /dev/urandom | dd of="$src.1g/big" bs=1M seek=500 conv=notrunc status=none
"$bindir/si-image" --store "$store" commit "$src.1g" bench >/dev/null 2>&1
si_pull 1 1g-file "$work/si-1g"
fi

python3 - "$results" "$work/changed_z" <<'PY'
import statistics, sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
changed_z = [int(l) for l in open(sys.argv[2])]
by = collections.defaultdict(list)
for rep, sc, tool, wall, cpu, wire, rss in rows:
    by[(sc, tool)].append((float(wall), cpu, int(wire), int(rss)))
print(f"{'scenario':<14}{'tool':<7}{'wall s':>9}{'cpu s node (+server)':>24}{'wire bytes':>14}{'node rss MB':>13}")
def cpu(x):  # "1.2 (+0.3)" or "1.2"
    node, _, server = x.partition(" (+")
    return float(node), float(server.rstrip(")")) if server else None
for (sc, tool), v in by.items():
    wall = statistics.median(x[0] for x in v)
    node = statistics.median(cpu(x[1])[0] for x in v)
    servers = [cpu(x[1])[1] for x in v if cpu(x[1])[1] is not None]
    c = f"{node:.2f}" + (f" (+{statistics.median(servers):.2f})" if servers else "")
    rss = statistics.median(x[3] for x in v)
    print(f"{sc:<14}{tool:<7}{wall:>9.2f}{c:>24}{v[0][2]:>14}{rss/1024:>13.1f}")
def med(sc, tool):
    v = by.get((sc, tool))
    return statistics.median(x[0] for x in v) if v else None
for sc in ("deploy-disk", "deploy-tmpfs", "update"):
    a, b = med(sc, "si"), med(sc, "rsync")
    if a and b:
        print(f"{sc}: si/rsync wall = {a / b:.2f}")
for sc in ("deploy-disk", "deploy-tmpfs", "update"):
    t, p = by.get((sc, "si")), by.get((sc, "si-plain"))
    if t and p:
        wall = statistics.median(x[0] for x in t) / statistics.median(x[0] for x in p)
        cput = statistics.median(cpu(x[1])[0] for x in t) / statistics.median(cpu(x[1])[0] for x in p)
        # The two ran back to back in each rep: the ratio within each rep, its median and range.
        tr = {r[0]: r for r in rows if r[1] == sc and r[2] == "si"}
        pr = {r[0]: r for r in rows if r[1] == sc and r[2] == "si-plain"}
        per = sorted(float(tr[k][3]) / float(pr[k][3]) for k in tr if k in pr)
        perc = sorted(cpu(tr[k][4])[0] / cpu(pr[k][4])[0] for k in tr if k in pr)
        print(f"{sc}: TLS cost (si / si-plain): wall {wall:.2f}x, node CPU {cput:.2f}x (ratios of the medians of {len(t)});"
              f" per rep: wall {statistics.median(per):.2f}x ({per[0]:.2f}..{per[-1]:.2f}),"
              f" node CPU {statistics.median(perc):.2f}x ({perc[0]:.2f}..{perc[-1]:.2f})")
si_up = [r for r in rows if r[1] == "update" and r[2] == "si"]
if si_up and changed_z:
    ratios = [int(r[5]) / changed_z[int(r[0]) - 1] for r in si_up]
    print(f"update: si wire / zstd-3 size of the changed and added files = {statistics.median(ratios):.2f} (median of {len(ratios)}; rep 1: {si_up[0][5]} / {changed_z[0]} bytes)")
PY
