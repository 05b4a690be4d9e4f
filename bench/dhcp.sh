#!/bin/bash
# DHCP load benchmark: perfdhcp (from kea-admin) against si-dhcpd, dnsmasq and Kea, each alone
# in a network namespace. Bounded: each run lasts PERIOD seconds at a fixed offered RATE.
#
#   sudo bench/dhcp.sh [RATES...]        (default rates: 200 1000)
#   SERVERS="si kea" picks servers, REPEAT=3 runs every row 3 times and prints medians,
#   PERIOD=10 seconds per row.
#
# Needs: root, kea-admin (perfdhcp), dnsmasq-base, kea-dhcp4-server, and
# `cargo build --release -p si-server --bins`. Everything runs in two namespaces named
# si-t<pid>-{bsrv,bcli} joined by a veth pair (10.213.0.1 server, 10.213.0.2 perfdhcp); nothing
# touches the host's interfaces. perfdhcp acts as a relay (giaddr 10.213.0.2), so replies are
# unicast to it.
set -euo pipefail

PERIOD=${PERIOD:-10}
CLIENTS=${CLIENTS:-5000}
RATES=("${@:-200 1000}")
# shellcheck disable=SC2206
RATES=(${RATES[*]})
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SI_DHCPD=${SI_DHCPD:-$ROOT/target/release/si-dhcpd}
SI_NODE=${SI_NODE:-$ROOT/target/release/si-node}
SRV=si-t$$-bsrv
CLI=si-t$$-bcli
WORK=$(mktemp -d /tmp/si-bench-dhcp.XXXXXX)
PID=

for t in perfdhcp dnsmasq kea-dhcp4 "$SI_DHCPD" "$SI_NODE"; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }

stop_server() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=; fi
}
cleanup() {
    stop_server
    for ns in "$SRV" "$CLI"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# Leftovers of earlier runs whose script is gone.
# (Names follow the test helper's si-t<pid>-<n> pattern, so every cleaner agrees on them.)
for ns in $(ip netns list | awk '{print $1}' | grep -E '^si-t[0-9]+-b(srv|cli)$' || true); do
    p=${ns#si-t}; p=${p%%-*}
    [ -d "/proc/$p" ] || ip netns del "$ns" 2>/dev/null || true
done

ip netns add "$SRV"
ip netns add "$CLI"
ip link add bs$$ netns "$SRV" type veth peer name bc$$ netns "$CLI"
ip -n "$SRV" addr add 10.213.0.1/16 dev bs$$
ip -n "$CLI" addr add 10.213.0.2/16 dev bc$$
for ns in "$SRV" "$CLI"; do ip -n "$ns" link set lo up; done
ip -n "$SRV" link set bs$$ up
ip -n "$CLI" link set bc$$ up
POOL_FIRST=10.213.100.0
POOL_LAST=10.213.139.255

wait_port() {
    for _ in $(seq 50); do
        ip netns exec "$SRV" ss -Hlun 'sport = :67' | grep -q . && return 0
        sleep 0.1
    done
    echo "server did not start" >&2; return 1
}

start_si() {
    rm -rf "$WORK/si"; mkdir -p "$WORK/si"
    "$SI_NODE" --state-dir "$WORK/si" subnet add bench --network 10.213.0.0/16 \
        --pool $POOL_FIRST-$POOL_LAST --lease-time 3600 >/dev/null
    RUST_LOG=warn ip netns exec "$SRV" "$SI_DHCPD" --state-dir "$WORK/si" --interface bs$$ \
        --unknown discover 2>"$WORK/si.log" &
    PID=$!
}

start_dnsmasq() {
    rm -f "$WORK/dnsmasq.leases"
    ip netns exec "$SRV" dnsmasq --no-daemon --conf-file=/dev/null --port=0 --no-resolv \
        --no-hosts --bind-interfaces --interface=bs$$ --no-ping --dhcp-authoritative \
        --dhcp-range=$POOL_FIRST,$POOL_LAST,255.255.0.0,1h --dhcp-lease-max=20000 \
        --dhcp-leasefile="$WORK/dnsmasq.leases" --pid-file="$WORK/dnsmasq.pid" 2>"$WORK/dnsmasq.log" &
    PID=$!
}

start_kea() {
    mkdir -p "$WORK/kea"; rm -f "$WORK/kea/"*
    cat >"$WORK/kea/kea.json" <<JSON
{ "Dhcp4": {
    "interfaces-config": { "interfaces": [ "bs$$" ], "dhcp-socket-type": "udp" },
    "lease-database": { "type": "memfile", "persist": true, "name": "$WORK/kea/leases.csv", "lfc-interval": 0 },
    "valid-lifetime": 3600,
    "subnet4": [ { "id": 1, "subnet": "10.213.0.0/16", "pools": [ { "pool": "$POOL_FIRST - $POOL_LAST" } ] } ],
    "loggers": [ { "name": "kea-dhcp4", "severity": "WARN", "output_options": [ { "output": "$WORK/kea/kea.log" } ] } ]
} }
JSON
    KEA_LOCKFILE_DIR="$WORK/kea" KEA_PIDFILE_DIR="$WORK/kea" \
        ip netns exec "$SRV" kea-dhcp4 -c "$WORK/kea/kea.json" >"$WORK/kea/stdout" 2>&1 &
    PID=$!
}

# perfdhcp output -> "rate avg_ms max_ms drops%"
measure() {
    local rate=$1 out
    out=$(ip netns exec "$CLI" timeout $((PERIOD + 15)) perfdhcp -4 -l bc$$ -r "$rate" \
        -R "$CLIENTS" -p "$PERIOD" -W 1000000 10.213.0.1 2>&1 || true)
    echo "$out" >"$WORK/perfdhcp.out"
    awk '
        /^\*\*\*Rate statistics\*\*\*/ {}
        /^Rate:/ { rate=$2 }
        /DISCOVER-OFFER/ { phase="DO" }
        /REQUEST-ACK/ { phase="RA" }
        /^sent packets:/ { if (phase=="DO") sent=$3 }
        /^received packets:/ { if (phase=="RA") recv=$3 }
        /^avg delay:/ { if (phase=="DO") ado=$3; else ara=$3 }
        /^max delay:/ { if (phase=="DO") mdo=$3; else mra=$3 }
        END {
            drop = (sent > 0) ? 100 * (sent - recv) / sent : 100
            printf "%s %s %s %s %s %.1f\n", rate ? rate : 0, ado ? ado : "-", ara ? ara : "-", mdo ? mdo : "-", mra ? mra : "-", drop
        }' <<<"$out"
}

REPEAT=${REPEAT:-1}
: >"$WORK/rows"
for ((rep = 1; rep <= REPEAT; rep++)); do
    for server in ${SERVERS:-si dnsmasq kea}; do
        for rate in "${RATES[@]}"; do
            "start_$server"
            wait_port
            sleep 0.5
            read -r got ado ara mdo mra drop < <(measure "$rate")
            stop_server
            echo "$server $rate $got $ado $ara $mdo $mra $drop" >>"$WORK/rows"
            echo "rep $rep: $server $rate: $got DORA/s, $ado/$ara ms, lost $drop%" >&2
        done
    done
done
python3 - "$WORK/rows" <<'PY'
import statistics, sys, collections
rows = collections.OrderedDict()
for l in open(sys.argv[1]):
    f = l.split()
    rows.setdefault((f[0], f[1]), []).append(f[2:])
def med(v, i):
    xs = [float(r[i]) for r in v if r[i] != "-"]
    return f"{statistics.median(xs):.3f}" if xs else "-"
print(f"{'server':<8} {'offered':>8} {'DORA/s':>10} {'avg D-O ms':>11} {'avg R-A ms':>11} {'max D-O ms':>11} {'max R-A ms':>11} {'lost %':>7}")
for (server, rate), v in rows.items():
    print(f"{server:<8} {rate:>8} {med(v,0):>10} {med(v,1):>11} {med(v,2):>11} {med(v,3):>11} {med(v,4):>11} {med(v,5):>7}")
PY
echo "(medians of $REPEAT; perfdhcp -p $PERIOD s per row, $CLIENTS distinct clients, relayed)"
