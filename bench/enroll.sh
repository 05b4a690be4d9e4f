#!/bin/bash
# What enrollment adds to an install: si-enroll (key generation, TLS pinned to the CA, the
# master's checks in one inventory transaction, the certificate issued, the identity saved)
# against si-server on 127.0.0.1, one node after another, and beside it the TLS connection an
# installer opens anyway (si-report of a step) and the same report over plain TCP.
#
#   bench/enroll.sh [--nodes N] [BINDIR]
#
#   BINDIR   directory with si-server, si-node, si-enroll and si-report (default target/release)
#   --nodes  nodes enrolled (default 20); medians and the slowest are printed
#
# Target (issue 13): enrollment adds at most 1 s to an install.
set -euo pipefail

nodes=20 bindir=
while [ $# -gt 0 ]; do
    case $1 in
    --nodes) nodes=$2; shift 2 ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) bindir=$1; shift ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
bindir=${bindir:-target/release}
[ -d "$bindir" ] || bindir=$repo/$bindir
bindir=$(cd "$bindir" && pwd)
for b in si-server si-node si-enroll si-report; do
    [ -x "$bindir/$b" ] || { echo "$0: $bindir/$b missing (cargo build --release --workspace --bins)" >&2; exit 1; }
done

work=$(mktemp -d /var/tmp/si-bench-enroll.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
wait_listen() {
    for _ in $(seq 200); do
        ss -Hltn "sport = :$1" | grep -q . && return 0
        sleep 0.05
    done
    echo "$0: nothing listens on $1" >&2; exit 1
}

state=$work/state
ca=$work/ca
tls_port=$(port)
plain_port=$(port)
"$bindir/si-server" --state-dir "$state" --ca-dir "$ca" --store "$work/store" \
    --listen "127.0.0.1:$tls_port" 2>"$work/server.log" &
pids+=($!)
wait_listen "$tls_port"
"$bindir/si-server" --state-dir "$work/state-plain" --ca-dir "$work/ca-plain" --store "$work/store-plain" \
    --listen "127.0.0.1:$plain_port" --insecure 2>"$work/server-plain.log" &
pids+=($!)
wait_listen "$plain_port"
pin=$("$bindir/si-server" --state-dir "$state" --ca-dir "$ca" ca show | grep -o 'sha256:[0-9a-f]*' | head -1)

times_enroll=() times_report=() times_plain=()
for i in $(seq "$nodes"); do
    n=$(printf 'n%03d' "$i")
    mac=$(printf '52:54:00:be:%02x:%02x' $((i / 256)) $((i % 256)))
    "$bindir/si-node" --state-dir "$state" add "$n" --mac "$mac" --boot install >/dev/null 2>&1
    "$bindir/si-node" --state-dir "$work/state-plain" add "$n" --mac "$mac" >/dev/null 2>&1
    token=$("$bindir/si-server" --state-dir "$state" --ca-dir "$ca" ca token "$n")
    t0=$(now)
    SI_ENROLL_TOKEN=$token "$bindir/si-enroll" --server "127.0.0.1:$tls_port" --ca-fingerprint "$pin" \
        --node "$n" --mac "$mac" --uuid "uuid-$n" --identity-dir "$work/id-$n" >/dev/null
    t1=$(now)
    "$bindir/si-report" --server "127.0.0.1:$tls_port" --ca-fingerprint "$pin" \
        --identity-dir "$work/id-$n" --node "$n" --state "step" --detail bench >/dev/null
    t2=$(now)
    "$bindir/si-report" --server "127.0.0.1:$plain_port" --insecure \
        --node "$n" --state "step" --detail bench >/dev/null 2>&1
    t3=$(now)
    times_enroll+=("$(echo "$t1 - $t0" | bc)")
    times_report+=("$(echo "$t2 - $t1" | bc)")
    times_plain+=("$(echo "$t3 - $t2" | bc)")
done

stats() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {printf "%.3f %.3f", a[int((NR+1)/2)], a[NR]}'; }
read -r e_med e_max <<<"$(stats "${times_enroll[@]}")"
read -r r_med r_max <<<"$(stats "${times_report[@]}")"
read -r p_med p_max <<<"$(stats "${times_plain[@]}")"
printf '%-44s %10s %10s\n' "$nodes nodes, one after another, 127.0.0.1" "median s" "max s"
printf '%-44s %10s %10s\n' "si-enroll (key, TLS, checks, certificate)" "$e_med" "$e_max"
printf '%-44s %10s %10s\n' "si-report over TLS with the new identity" "$r_med" "$r_max"
printf '%-44s %10s %10s\n' "si-report over plain TCP (--insecure)" "$p_med" "$p_max"
printf 'enrollment adds %s s (median) to an install; target <= 1 s\n' "$e_med"
