#!/bin/bash
# Broadcast benchmark: N nodes deployed at once, side by side in one run: si (a chain of
# si-relay, TLS, node certificates), rsync from a daemon on the master (SystemImager's way), and
# udp-sender/udp-receiver with tar (SystemImager's Flamethrower way). Every node is a network
# namespace on one bridge in the master's namespace; every link (the master's own and each
# node's, both ways) is shaped with tc; node roots are on tmpfs. See bench/README.md.
#
#   bench/broadcast.sh [--nodes "1 2 4 8 16"] [--rates "200mbit 1gbit"] [--mb 128]
#                      [--tools "si rsync udpcast"] [--workdir DIR] [--keep] [BINDIR]
#
#   BINDIR     directory with si-image, si-server, si-node, si-enroll, si-relay (default
#              target/release)
#   --nodes    the session sizes (default "1 2 4 8 16")
#   --rates    link rates for tc (default "200mbit 1gbit")
#   --mb       MiB of incompressible data in the image beside the small Debian tree (default 128)
#   --tools    which tools run (default "si si-kill rsync udpcast"; si-kill is si's chain with
#              node1 killed by SIGKILL once half the payload reached it, for N >= 3: its
#              successors heal around it; node1 is left out of the figures; si-cut is the
#              same with node1's link set down instead, which only the stall timer notices)
#   --stall    si-relay's --stall-secs (default 5, its own default): how long a silent upstream
#              is waited for before a node moves on (what a cut link costs)
#   --queue    how long a shaped link may queue (tbf latency; default 5ms, a switch port's
#              buffer: a deep queue on a relay's link holds its acknowledgements to its own
#              upstream behind the data it forwards)
#
# Columns: completion p50 and max (s, from the start of the session to each node's tree being
# complete: si's installed record, rsync's and tar's exit), the master's egress (bytes it sent,
# its bridge's transmit counter, as a multiple of one payload), CPU seconds per node, and CPU
# seconds of everything (nodes and master) per wall second: `cpu-bound` where that is 1.6 or more
# of the 2 cores (the machine, not the links, was the limit: 2 cores emulate every node here).
# udp-sender is paced at 90 % of the link rate (--max-bitrate), as a Flamethrower site sets it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
sizes="1 2 4 8 16"
rates="200mbit 1gbit"
mb=128
tools="si si-kill rsync udpcast"
queue=5ms
stall=5
workbase=/var/tmp
keep=0
bindir=$repo/target/release
while [ $# -gt 0 ]; do
    case $1 in
    --nodes) sizes=$2; shift 2 ;;
    --rates) rates=$2; shift 2 ;;
    --mb) mb=$2; shift 2 ;;
    --tools) tools=$2; shift 2 ;;
    --queue) queue=$2; shift 2 ;;
    --stall) stall=$2; shift 2 ;;
    --workdir) workbase=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,32p' "$0"; exit 0 ;;
    -*) echo "$0: unknown option $1" >&2; exit 2 ;;
    *) bindir=$1; shift ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (namespaces, tc, tmpfs)" >&2; exit 1; }
for b in si-image si-server si-node si-enroll si-relay; do
    [ -x "$bindir/$b" ] || { echo "$0: $bindir/$b missing: cargo build --release --workspace --bins" >&2; exit 1; }
done
for tool in rsync tc tar python3 openssl; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing" >&2; exit 1; }
done
case " $tools " in *" udpcast "*)
    command -v udp-sender >/dev/null || { echo "$0: udp-sender is missing: apt-get install udpcast (or --tools \"si rsync\")" >&2; exit 1; } ;;
esac
[ -x /usr/bin/time ] || { echo "$0: /usr/bin/time is missing: apt-get install time" >&2; exit 1; }
max=0
for n in $sizes; do [ "$n" -gt "$max" ] && max=$n; done
[ "$max" -ge 1 ] && [ "$max" -le 32 ] || { echo "$0: --nodes must be between 1 and 32" >&2; exit 2; }

pfx=si-bbc$$
work=$(mktemp -d "$workbase/si-bench-broadcast.XXXXXX")
pids=()
cleanup() {
    local p ns
    disown -a 2>/dev/null || true # the services are killed below: no "Killed" lines
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for ns in $(ip netns list | awk '{print $1}' | grep "^$pfx-" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    done
    sleep 0.2
    umount "$work/tmpfs" 2>/dev/null || true
    for ns in $(ip netns list | awk '{print $1}' | grep "^$pfx-" || true); do ip netns del "$ns" 2>/dev/null || true; done
    if [ "$keep" -eq 0 ]; then rm -rf --one-file-system "$work"; else echo "kept $work" >&2; fi
}
trap cleanup EXIT
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# Leftover namespaces of dead runs.
for ns in $(ip netns list | awk '{print $1}' | grep "^si-bbc" || true); do
    pid=${ns#si-bbc}; pid=${pid%%-*}
    [ -d "/proc/$pid" ] || ip netns del "$ns" 2>/dev/null || true
done

M=10.213.210.1
nm=$pfx-m
ip netns add "$nm"
ip -n "$nm" link set lo up
ip -n "$nm" link add br0 type bridge mcast_snooping 0
ip -n "$nm" addr add $M/24 brd + dev br0 # udpcast finds its rendezvous by the broadcast address
ip -n "$nm" link set br0 up
node_ip() { echo "10.213.210.$((10 + $1))"; }
for ((i = 0; i < max; i++)); do
    ip netns add "$pfx-n$i"
    ip -n "$pfx-n$i" link set lo up
    ip link add "bb$$m$i" netns "$nm" type veth peer name "bb$$n$i" netns "$pfx-n$i"
    ip -n "$nm" link set "bb$$m$i" master br0 up
    ip -n "$pfx-n$i" addr add "$(node_ip "$i")/24" brd + dev "bb$$n$i"
    ip -n "$pfx-n$i" link set "bb$$n$i" up
    # Multicast leaves by this link (udp-receiver joins the group on it).
    ip -n "$pfx-n$i" route add 224.0.0.0/4 dev "bb$$n$i"
done
ip -n "$nm" route add 224.0.0.0/4 dev br0
shape() { # rate: every link, both ways, and the master's own
    local i
    ip netns exec "$nm" tc qdisc replace dev br0 root tbf rate "$1" burst 256kb latency "$queue"
    for ((i = 0; i < max; i++)); do
        ip netns exec "$nm" tc qdisc replace dev "bb$$m$i" root tbf rate "$1" burst 256kb latency "$queue"
        ip netns exec "$pfx-n$i" tc qdisc replace dev "bb$$n$i" root tbf rate "$1" burst 256kb latency "$queue"
    done
}

log "building the image: the small Debian tree and $mb MiB of noise"
src=$work/golden
bash "$repo/tests/fixtures/rootfs.sh" "$src" small >/dev/null
{ openssl enc -aes-128-ctr -nosalt -pass pass:bench </dev/zero 2>/dev/null || true; } | head -c "${mb}M" >"$src/var/big.img"
store=$work/store
"$bindir/si-image" --store "$store" commit "$src" bench >/dev/null 2>&1
payload=$(du -sb --apparent-size "$src" | awk '{print $1}')

state=$work/state
pin=$("$bindir/si-server" --state-dir "$state" ca show | sed -n 's/^fingerprint: *//p')
ip netns exec "$nm" "$bindir/si-server" --store "$store" --state-dir "$state" --listen 0.0.0.0:7811 2>"$work/server.log" &
pids+=($!)
server_pid=$!
cat >"$work/rsyncd.conf" <<CONF
port = 873
pid file = $work/rsyncd.pid
use chroot = yes
max connections = 64
[img]
    path = $src
    read only = yes
    uid = 0
    gid = 0
    numeric ids = yes
CONF
ip netns exec "$nm" rsync --daemon --no-detach --config="$work/rsyncd.conf" &
pids+=($!)
rsyncd_pid=$!
wait_port() { # port log
    local i
    for ((i = 0; i < 200; i++)); do
        ip netns exec "$nm" bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$0: nothing listens on port $1:" >&2; cat "$2" >&2; exit 1
}
wait_port 7811 "$work/server.log"
wait_port 873 /dev/null

log "enrolling $max nodes (each a key and certificate from the master's CA, as an installer does)"
for ((i = 0; i < max; i++)); do
    mac=$(printf '52:54:00:bb:00:%02x' "$i")
    "$bindir/si-node" --state-dir "$state" --images bench add "node$i" --mac "$mac" --image bench --boot install >/dev/null 2>&1
    token=$("$bindir/si-server" --state-dir "$state" ca token "node$i")
    SI_ENROLL_TOKEN=$token ip netns exec "$pfx-n$i" "$bindir/si-enroll" --server "$M:7811" \
        --ca-fingerprint "$pin" --node "node$i" --mac "$mac" --uuid "node$i" \
        --identity-dir "$work/node$i.id" >/dev/null
done

mkdir -p "$work/tmpfs"
mount -t tmpfs -o size=$(((max + 1) * (payload / 1048576 + 64)))m si-bench "$work/tmpfs"
root() { echo "$work/tmpfs/node$1"; }

pcpu() { # CPU seconds of a process and its waited-for children
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15+$16+$17)/hz}' "/proc/$1/stat"
}
master_tx() { ip -n "$nm" -s -j link show br0 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stats64"]["tx"]["bytes"])'; }
now() { date +%s.%N; }

fresh() { # n: empty roots and state, caches dropped (the image is read from disk as on a master)
    local i
    for ((i = 0; i < $1; i++)); do
        rm -rf "$(root "$i")" "$(root "$i").state"
        mkdir -p "$(root "$i")"
    done
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

run_si() { # n [victim kill|cut]: a chain node0 → node1 → ...; each node's completion is its
    # installed record. With a victim, that node is killed (SIGKILL) or its link set down once
    # half the noise reached it.
    local n=$1 victim=${2:--1} how=${3:-kill} i j ups
    local kids=()
    for ((i = 0; i < n; i++)); do
        ups=()
        for ((j = i - 1; j >= 0; j--)); do ups+=("node$j@$(node_ip "$j"):7812"); done
        local args=(--server "$M" --image bench --root "$(root "$i")" --state-dir "$(root "$i").state"
            --identity-dir "$work/node$i.id" --ca-fingerprint "$pin" --stall-secs "$stall"
            # With a fault, a finished relay stays until its successors' stall timers ran out
            # (a healing node reattaches to it); otherwise 2 s is enough.
            --linger-secs $([ "$victim" -ge 0 ] && echo $((stall + 3)) || echo 2))
        [ ${#ups[@]} -gt 0 ] && args+=(--relay-from "$(IFS=,; echo "${ups[*]}")")
        [ $((i + 1)) -lt "$n" ] && args+=(--relay-listen "$(node_ip "$i"):7812")
        /usr/bin/time -f '%e %U %S' -o "$work/t.$i" ip netns exec "$pfx-n$i" "$bindir/si-relay" "${args[@]}" \
            >/dev/null 2>"$work/relay$i.log" &
        kids+=($!)
    done
    if [ "$victim" -ge 0 ]; then
        local half=$((mb * 1048576 / 2)) got=0
        while [ "$got" -lt "$half" ]; do
            got=$(($(stat -c '%b * %B' "$(root "$victim")/var/big.img" 2>/dev/null || echo 0)))
            kill -0 "${kids[$victim]}" 2>/dev/null || { echo "node$victim ended before it was killed" >&2; return 1; }
            sleep 0.05
        done
        if [ "$how" = kill ]; then
            ip netns pids "$pfx-n$victim" | xargs -r kill -9
        else
            ip -n "$nm" link set "bb$$m$victim" down
            ip netns pids "$pfx-n$victim" | xargs -r kill -9 # it could not finish: not waited for
        fi
    fi
    for ((i = 0; i < n; i++)); do
        if [ "$i" -eq "$victim" ]; then
            wait "${kids[$i]}" 2>/dev/null || true
            continue
        fi
        wait "${kids[$i]}" || { echo "si-relay on node$i failed:" >&2; tail -5 "$work/relay$i.log" >&2; return 1; }
        stat -c %.9Y "$(root "$i").state/installed.toml" >"$work/done.$i"
    done
}

run_rsync() { # n: every node pulls from the daemon at once
    local n=$1 i kids=()
    for ((i = 0; i < n; i++)); do
        (
            /usr/bin/time -f '%e %U %S' -o "$work/t.$i" ip netns exec "$pfx-n$i" rsync -aHAXS --numeric-ids \
                "rsync://$M/img/" "$(root "$i")/" >"$work/rsync$i.log" 2>&1
            now >"$work/done.$i"
        ) &
        kids+=($!)
    done
    for ((i = 0; i < n; i++)); do
        wait "${kids[$i]}" || { echo "rsync on node$i failed:" >&2; tail -5 "$work/rsync$i.log" >&2; return 1; }
    done
}

run_udpcast() { # n rate: receivers first, then one paced sender for all of them
    local n=$1 rate=$2 i kids=() mbit
    mbit=$(python3 -c 'import re,sys; r=sys.argv[1].lower(); m=re.fullmatch(r"(\d+)(k|m|g)bit",r); print(int(int(m[1])*{"k":1e-3,"m":1,"g":1e3}[m[2]]*0.9))' "$rate")
    for ((i = 0; i < n; i++)); do
        (
            /usr/bin/time -f '%e %U %S' -o "$work/t.$i" ip netns exec "$pfx-n$i" sh -c \
                "udp-receiver --nokbd --interface bb$$n$i --portbase 9000 2>/dev/null | tar -C '$(root "$i")' -xpf -" \
                >"$work/udp$i.log" 2>&1
            now >"$work/done.$i"
        ) &
        kids+=($!)
    done
    /usr/bin/time -f '%e %U %S' -o "$work/t.sender" ip netns exec "$nm" sh -c \
        "tar -C '$src' -cf - . | udp-sender --nokbd --interface br0 --portbase 9000 --min-receivers $n --max-wait 60 --max-bitrate ${mbit}m 2>'$work/sender.log'"
    for ((i = 0; i < n; i++)); do
        wait "${kids[$i]}" || { echo "udp-receiver on node$i failed:" >&2; cat "$work/udp$i.log" >&2; return 1; }
    done
}

results=$work/results.tsv
: >"$results"
for rate in $rates; do
    shape "$rate"
    for n in $sizes; do
        for tool in $tools; do
            case $tool in si-kill | si-cut) [ "$n" -lt 3 ] && continue ;; esac
            fresh "$n"
            log "$rate: $tool to $n nodes"
            tx0=$(master_tx)
            cpu0=$(echo "$(pcpu "$server_pid") + $(pcpu "$rsyncd_pid")" | bc)
            t0=$(now)
            rm -f "$work"/t.* "$work"/done.*
            case $tool in
            si) run_si "$n" ;;
            si-kill) run_si "$n" 1 kill ;;
            si-cut) run_si "$n" 1 cut; ip -n "$nm" link set "bb$$m1" up ;;
            rsync) run_rsync "$n" ;;
            udpcast) run_udpcast "$n" "$rate" ;;
            esac
            t1=$(now)
            tx=$(($(master_tx) - tx0))
            cpu1=$(echo "$(pcpu "$server_pid") + $(pcpu "$rsyncd_pid")" | bc)
            python3 - "$work" "$n" "$t0" "$t1" "$tx" "$payload" "$(echo "$cpu1 - $cpu0" | bc)" "$rate" "$tool" >>"$results" <<'PY'
import os, statistics, sys
work, n, t0, t1, tx, payload, mcpu, rate, tool = sys.argv[1:]
n, t0, t1, tx, payload, mcpu = int(n), float(t0), float(t1), int(tx), int(payload), float(mcpu)
# A killed node (si-kill: node1) has no completion and is left out.
alive = [i for i in range(n) if os.path.exists(f"{work}/done.{i}")]
done = sorted(float(open(f"{work}/done.{i}").read()) - t0 for i in alive)
cpu = []
for i in alive:
    _, u, s = open(f"{work}/t.{i}").read().split()[-3:]
    cpu.append(float(u) + float(s))
if os.path.exists(f"{work}/t.sender"):
    _, u, s = open(f"{work}/t.sender").read().split()[-3:]
    mcpu += float(u) + float(s)
wall = t1 - t0
# CPU per second of the session until the last node was complete (relays linger idle after)
load = (sum(cpu) + mcpu) / max(done[-1], 1e-3)
print("\t".join([rate, str(n), tool, f"{statistics.median(done):.2f}", f"{done[-1]:.2f}",
                 f"{tx / payload:.2f}", f"{sum(cpu) / len(alive):.2f}", f"{load:.2f}",
                 "cpu-bound" if load >= 1.6 else ""]))
PY
            # Every node's tree is the image (spot check: the big file and the file count).
            for ((i = 0; i < n; i++)); do
                case $tool in si-kill | si-cut) [ "$i" -eq 1 ] && continue ;; esac
                cmp -s "$src/var/big.img" "$(root "$i")/var/big.img" || { echo "$tool: node$i's var/big.img differs" >&2; exit 1; }
            done
        done
    done
done

echo
echo "payload $payload bytes ($mb MiB of noise and the small Debian tree); $(nproc) cores"
python3 - "$results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
hdr = ["rate", "N", "tool", "p50 s", "max s", "master egress", "CPU s/node", "CPU/wall", ""]
print("\t".join(hdr))
for r in rows:
    r = r[:5] + [r[5] + "x"] + r[6:]
    print("\t".join(r))
print()
t = {(r[0], int(r[1]), r[2]): r for r in rows}
for rate in sorted({r[0] for r in rows}, key=[r[0] for r in rows].index):
    ns = sorted({int(r[1]) for r in rows if r[0] == rate})
    if ("si" in {r[2] for r in rows}) and (rate, 1, "si") in t:
        one = float(t[(rate, 1, "si")][4])
        print(f"{rate}: si T(N)/T(1) (max): " + ", ".join(
            f"N={n} {float(t[(rate, n, 'si')][4]) / one:.2f}" + ("*" if t[(rate, n, 'si')][8] else "")
            for n in ns if (rate, n, "si") in t))
    for fault, what in (("si-kill", "node1 killed half way"), ("si-cut", "node1's link cut half way")):
        pairs = [(n, t[(rate, n, fault)], t[(rate, n, "si")]) for n in ns
                 if (rate, n, fault) in t and (rate, n, "si") in t]
        if pairs:
            print(f"{rate}: {fault}/si (max, {what}): " + ", ".join(
                f"N={n} {float(k[4]) / float(s[4]):.2f}" + ("*" if k[8] or s[8] else "") for n, k, s in pairs))
    for other in ("udpcast", "rsync"):
        pairs = [(n, t[(rate, n, other)], t[(rate, n, "si")]) for n in ns
                 if (rate, n, other) in t and (rate, n, "si") in t]
        if pairs:
            print(f"{rate}: {other}/si (max): " + ", ".join(
                f"N={n} {float(o[4]) / float(s[4]):.2f}" for n, o, s in pairs))
print("(* cpu-bound: the 2 cores, not the links, were the limit)")
PY
