#!/bin/bash
# Installs the same image onto the same two loop disks the si way and the SystemImager way,
# over loopback only (127.0.0.1), and prints per-step times (medians).
#
#   sudo bench/install.sh [--repeat N] [--workdir DIR] [--keep] [--tree small|gen] [BINDIR]
#
#   BINDIR   directory with si-image, si-server and si-install (default target/release)
#   --tree   gen (default): a generated tree (special.sh + 1500 files, ~300 MB);
#            small: the debootstrap minbase tree of tests/fixtures/rootfs.sh
#
# si:            si-install --config PLAN --disks A,B (wipe, sfdisk, mkfs, mount the layout,
#                pull from si-server on 127.0.0.1, configure), then a fast reinstall
#                (--reinstall sync) after 20 files of the image changed.
# SystemImager:  wipefs, parted (mklabel, mkpart), mkfs, mount, then
#                `rsync -aHAXS --numeric-ids` from an rsync daemon on 127.0.0.1; then the same
#                rsync again after the 20 files changed (its "reinstall": the disks are
#                re-partitioned and re-formatted, as SystemImager does on every install).
# Layout for both: disk A GPT (1 MiB BIOS boot, 256 MiB /boot, 256 MiB swap, / the rest),
# disk B msdos (/var the whole disk); ext4 everywhere.
set -euo pipefail

repeat=1 work_parent=/var/tmp keep=0 tree=gen bindir=
while [ $# -gt 0 ]; do
    case $1 in
    --repeat) repeat=$2; shift 2 ;;
    --workdir) work_parent=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --tree) tree=$2; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) bindir=$1; shift ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
bindir=${bindir:-target/release}
[ -d "$bindir" ] || bindir=$repo/$bindir
bindir=$(cd "$bindir" && pwd)
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (loop devices, mkfs, mount)" >&2; exit 1; }
for b in si-image si-server si-install; do
    [ -x "$bindir/$b" ] || { echo "$0: $bindir/$b missing (cargo build --release --workspace --bins)" >&2; exit 1; }
done
for t in parted rsync mkfs.ext4 mkswap partx losetup /usr/bin/time; do
    command -v "$t" >/dev/null || { echo "$0: $t missing" >&2; exit 1; }
done

work=$(mktemp -d "$work_parent/si-bench-install.XXXXXX")
loops=() pids=()
cleanup() {
    set +e
    for m in $(awk -v w="$work" '$2 ~ "^"w {print $2}' /proc/mounts | sort -r); do umount -l "$m"; done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    for l in "${loops[@]}"; do partx -d "$l" 2>/dev/null; losetup -d "$l"; done
    if [ "$keep" -eq 0 ]; then rm -rf --one-file-system "$work"; else echo "kept $work" >&2; fi
}
trap cleanup EXIT
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
results=$work/results.tsv
: >"$results"
record() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$results"; } # rep tool step seconds
now() { date +%s.%N; }

log "building the image tree ($tree)"
src=$work/golden
if [ "$tree" = small ]; then
    bash "$repo/tests/fixtures/rootfs.sh" "$src" small >/dev/null
else
    bash "$repo/tests/fixtures/special.sh" "$src" >/dev/null
    python3 - "$src" <<'PY'
import os, random, sys
root = sys.argv[1]
r = random.Random(7)
for d in ["usr/lib/gen", "usr/share/gen", "boot", "var/lib/gen", "etc/gen"]:
    os.makedirs(os.path.join(root, d), exist_ok=True)
for i in range(1500):
    d = r.choice(["usr/lib/gen", "usr/share/gen", "var/lib/gen", "etc/gen", "usr/lib/gen"])
    size = r.choice([4 << 10, 16 << 10, 64 << 10, 256 << 10, 600 << 10, 1 << 20])
    with open(os.path.join(root, d, f"f{i:05}"), "wb") as f:
        f.write(r.randbytes(size))
with open(os.path.join(root, "boot/vmlinuz-bench"), "wb") as f:
    f.write(r.randbytes(8 << 20))
PY
fi
find "$src" -type f -exec cat {} + >/dev/null 2>&1 || true
store=$work/store
"$bindir/si-image" --store "$store" commit "$src" img >/dev/null 2>&1

port_free() { ! ss -ltnH "sport = :$1" | grep -q .; }
pick_port() { local p; for p in $(seq "$1" $(($1 + 200))); do port_free "$p" && { echo "$p"; return; }; done; exit 1; }
wait_listen() { for _ in $(seq 200); do ss -ltnH "sport = :$1" | grep -q . && return; sleep 0.05; done; echo "port $1 never listened" >&2; exit 1; }

sport=$(pick_port 27811)
"$bindir/si-server" --store "$store" --state-dir "$work/state" --listen "127.0.0.1:$sport" 2>"$work/server.log" &
pids+=($!)
rport=$(pick_port 28873)
cat >"$work/rsyncd.conf" <<CONF
port = $rport
address = 127.0.0.1
pid file = $work/rsyncd.pid
use chroot = yes
[img]
    path = $src
    read only = yes
    uid = 0
    gid = 0
    numeric ids = yes
CONF
rsync --daemon --no-detach --config="$work/rsyncd.conf" &
pids+=($!)
wait_listen "$sport"
wait_listen "$rport"

for i in 0 1; do
    truncate -s 3G "$work/disk$i.img"
    loops+=("$(losetup -f --show -P "$work/disk$i.img")")
done
A=${loops[0]} B=${loops[1]}

cat >"$work/plan.toml" <<PLAN
node = "bench"
image = "img"
hostname = "bench"
layout = '''
format = 2
firmware = "bios"
[[disk]]
name = "a"
table = "gpt"
[[disk.partition]]
number = 1
size = 1048576
type = "21686148-6449-6E6F-744E-656564454649"
flags = ["bios_grub"]
[[disk.partition]]
number = 2
size = 268435456
type = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
[[disk.partition]]
number = 3
size = 268435456
type = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
[[disk.partition]]
number = 4
size = 0
grow = true
type = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
[[disk]]
name = "b"
table = "msdos"
[[disk.partition]]
number = 1
size = 0
grow = true
type = "0x83"
[[filesystem]]
device = "a4"
type = "ext4"
mountpoint = "/"
[[filesystem]]
device = "a2"
type = "ext4"
mountpoint = "/boot"
[[filesystem]]
device = "a3"
type = "swap"
[[filesystem]]
device = "b1"
type = "ext4"
mountpoint = "/var"
'''
PLAN

si_install() { # rep label [extra...]
    local rep=$1 label=$2; shift 2
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    find "$src" -type f -exec cat {} + >/dev/null 2>&1 || true
    /usr/bin/time -f '%e %M' -o "$work/t.si" "$bindir/si-install" --config "$work/plan.toml" \
        --target "$work/target" --server "127.0.0.1:$sport" --firmware bios --disks "$A,$B" "$@" \
        >"$work/si.out" 2>"$work/si.err" || { cat "$work/si.out" "$work/si.err" >&2; exit 1; }
    read -r wall rss <"$work/t.si"
    record "$rep" "$label" total "$wall"
    record "$rep" "$label" rss_mb "$(echo "scale=1; $rss / 1024" | bc)"
    sed -n 's/^step \([a-z-]*\): done in \([0-9.]*\) s$/\1 \2/p' "$work/si.out" | while read -r st secs; do
        record "$rep" "$label" "$st" "$secs"
    done
}

part_node() { # disk n: the partition's /dev node, through sysfs
    local d=${1#/dev/} p
    for p in /sys/class/block/"$d"/*/partition; do
        [ -e "$p" ] || continue
        [ "$(cat "$p" 2>/dev/null)" = "$2" ] && { echo "/dev/$(basename "$(dirname "$p")")"; return; }
    done
    return 1
}

si_way() { # the SystemImager way; rep label
    local rep=$1 label=$2 t0 t m=$work/simnt
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    find "$src" -type f -exec cat {} + >/dev/null 2>&1 || true
    local start; start=$(now)
    t0=$(now)
    for d in "$A" "$B"; do
        for p in /sys/class/block/"${d#/dev/}"/*/partition; do [ -e "$p" ] && wipefs -a -q "/dev/$(basename "$(dirname "$p")")"; done
        wipefs -a -q "$d"
    done
    t=$(now); record "$rep" "$label" wipe "$(echo "$t - $t0" | bc)"; t0=$t
    parted -s -a optimal "$A" mklabel gpt mkpart bios 1MiB 2MiB set 1 bios_grub on \
        mkpart boot ext4 2MiB 258MiB mkpart swap linux-swap 258MiB 514MiB mkpart root ext4 514MiB 100%
    parted -s -a optimal "$B" mklabel msdos mkpart primary ext4 1MiB 100%
    for d in "$A" "$B"; do blockdev --rereadpt "$d" 2>/dev/null || true; part_node "$d" 1 >/dev/null || partx -a "$d"; done
    t=$(now); record "$rep" "$label" partition "$(echo "$t - $t0" | bc)"; t0=$t
    mkfs.ext4 -F -q "$(part_node "$A" 4)"
    mkfs.ext4 -F -q "$(part_node "$A" 2)"
    mkswap "$(part_node "$A" 3)" >/dev/null
    mkfs.ext4 -F -q "$(part_node "$B" 1)"
    t=$(now); record "$rep" "$label" mkfs "$(echo "$t - $t0" | bc)"; t0=$t
    mkdir -p "$m"
    mount "$(part_node "$A" 4)" "$m"
    mkdir -p "$m/boot" "$m/var"
    mount "$(part_node "$A" 2)" "$m/boot"
    mount "$(part_node "$B" 1)" "$m/var"
    t=$(now); record "$rep" "$label" mount "$(echo "$t - $t0" | bc)"; t0=$t
    /usr/bin/time -f '%e %M' -o "$work/t.rsync" rsync -aHAXS --numeric-ids "rsync://127.0.0.1:$rport/img/" "$m/"
    t=$(now); record "$rep" "$label" pull "$(echo "$t - $t0" | bc)"; t0=$t
    read -r _ rss <"$work/t.rsync"
    umount "$m/var" "$m/boot" "$m"
    sync
    t=$(now); record "$rep" "$label" finish "$(echo "$t - $t0" | bc)"
    record "$rep" "$label" total "$(echo "$t - $start" | bc)"
    record "$rep" "$label" rss_mb "$(echo "scale=1; $rss / 1024" | bc)"
}

for rep in $(seq "$repeat"); do
    log "rep $rep: si full install"
    si_install "$rep" si
    log "rep $rep: SystemImager way (parted, mkfs, rsync)"
    si_way "$rep" systemimager
    log "rep $rep: si again, then 20 files change, then si fast reinstall"
    si_install "$rep" si-2 >/dev/null
    python3 "$repo/bench/mutate.py" "$src" --count 20 --bytes $((20 * 256 * 1024)) --seed "$rep" >/dev/null 2>&1 ||
        { log "mutate.py found no candidates; appending to 20 files instead"; }
    "$bindir/si-image" --store "$store" commit "$src" img >/dev/null 2>&1
    si_install "$rep" si-sync --reinstall sync
    grep -q "updating in place" "$work/si.out" || { echo "the fast reinstall did not update in place" >&2; cat "$work/si.out" >&2; exit 1; }
done

python3 - "$results" <<'PY'
import collections, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
v = collections.defaultdict(list)
for rep, tool, step, secs in rows:
    v[(tool, step)].append(float(secs))
med = {k: statistics.median(x) for k, x in v.items()}
steps = ["wipe", "partition", "raid", "lvm", "mkfs", "mount", "pull", "overrides", "configure", "bootloader", "finish", "total", "rss_mb"]
tools = ["si", "systemimager", "si-sync"]
print(f"{'step':<12}" + "".join(f"{t:>14}" for t in tools))
for s in steps:
    if not any((t, s) in med for t in tools):
        continue
    print(f"{s:<12}" + "".join(f"{med[(t, s)]:>14.2f}" if (t, s) in med else f"{'-':>14}" for t in tools))
si, sim, sync = med.get(("si", "total")), med.get(("systemimager", "total")), med.get(("si-sync", "total"))
if si and sim:
    print(f"si / SystemImager way (whole install): {si / sim:.2f}x (target <= 0.5x)")
if si and sync:
    print(f"fast reinstall (20 files changed) / full si install: {sync / si:.2f}x (target <= 0.1x)")
print(f"medians of {len(v[('si', 'total')])} run(s); seconds except rss_mb (peak RSS of si-install / the rsync client)")
PY
