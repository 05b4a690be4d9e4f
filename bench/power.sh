#!/bin/bash
# `si-power status` over many simulated BMCs, a quarter of them unreachable, against ipmitool
# in a shell loop and ipmitool under `xargs -P`. Prints a table of wall and CPU (user+sys)
# seconds, median of REPEAT runs.
#
# Everything happens inside a network namespace `si-t<pid>-bench`: SIMS ipmi_sim instances on
# 10.213.50.1 (distinct ports) serve the reachable nodes; the unreachable ones are addresses
# 10.213.51.1+ whose datagrams go into a veth end with nothing behind it (no reply, no ICMP),
# like a BMC that is off or cut off. Nothing leaves the namespace.
#
# Needs root, openipmi, ipmitool. Usage: bench/power.sh [NODES] (default 200)
# Environment: SIMS (10), REPEAT (3), TIMEOUT (2 s per node), FANOUT (64), SI_POWER (binary),
# UNREACH (NODES/4), METHODS ("si xargs loop"; e.g. METHODS=si for large runs).
set -euo pipefail

NODES=${1:-200}
SIMS=${SIMS:-10}
REPEAT=${REPEAT:-3}
TIMEOUT=${TIMEOUT:-2}
FANOUT=${FANOUT:-64}
here=$(cd "$(dirname "$0")/.." && pwd)
fix=$here/tests/fixtures/ipmi
SI_POWER=${SI_POWER:-$here/target/release/si-power}
[ -x "$SI_POWER" ] || SI_POWER=$here/target/debug/si-power
[ -x "$SI_POWER" ] || { echo "build si-power first (cargo build --release -p si-server --bin si-power)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespace)" >&2; exit 1; }

ns=si-t$$-bench  # si-t<pid>-...: the tests' stale-namespace sweep keeps it while we run
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add bmcnet type veth peer name bmcsink
ip -n "$ns" addr add 10.213.50.1/24 dev bmcnet
ip -n "$ns" link set bmcnet up
ip -n "$ns" link set bmcsink up
ip -n "$ns" route add 10.213.48.0/20 dev bmcnet   # unreachable BMCs: 10.213.51.1 ...

unreach=${UNREACH:-$((NODES / 4))}
METHODS=${METHODS:-si xargs loop}
reach=$((NODES - unreach))
for i in $(seq 1 "$SIMS"); do
    d=$work/sim$i
    mkdir -p "$d/state" "$d/persist"
    cp "$fix/chassis_control.sh" "$d/"
    sed -e "s|@NAME@|bench$i|g" -e "s|@ADDR@|10.213.50.1|g" -e "s|@PORT@|$((7000 + i))|g" \
        -e "s|@CONSOLE@|$((17000 + i))|g" -e "s|@DIR@|$d|g" -e "s|@PASSWORD@|secret|g" \
        "$fix/lan.conf.in" | grep -v '^console' > "$d/lan.conf"
    ip netns exec "$ns" ipmi_sim -c "$d/lan.conf" -f "$fix/sim.emu" -s "$d/persist" -n \
        </dev/null >"$d/log" 2>&1 &
    pids+=($!)
done

{
    echo "state_dir = \"$work/si-state\""
    printf '[defaults]\nuser = "admin"\npassword = "secret"\ncipher_suite = 3\n'
} > "$work/bmc.toml"
: > "$work/targets"
for n in $(seq 1 "$NODES"); do
    if [ "$n" -le "$reach" ]; then
        host=10.213.50.1 port=$((7001 + n % SIMS))
    else
        i=$((n - reach - 1))
        host=10.213.$((51 + i / 250)).$((1 + i % 250)) port=623
        ip -n "$ns" neigh add "$host" lladdr 02:00:00:00:00:99 dev bmcnet nud permanent
    fi
    printf '[nodes.b%03d]\nhost = "%s"\nport = %d\n' "$n" "$host" "$port" >> "$work/bmc.toml"
    echo "$host $port" >> "$work/targets"
done
chmod 600 "$work/bmc.toml"
sleep 1
for i in $(seq 1 "$SIMS"); do
    ip netns exec "$ns" ss -Hlun "sport = :$((7000 + i))" | grep -q . || { echo "sim $i did not start" >&2; cat "$work/sim$i/log" >&2; exit 1; }
done

# ipmitool: one try of TIMEOUT seconds per node, as close to si's per-node limit as it allows.
cat > "$work/one.sh" <<EOF
#!/bin/sh
ipmitool -I lanplus -C 3 -H "\$1" -p "\$2" -U admin -E -N $TIMEOUT -R 1 power status >/dev/null 2>&1 && echo ok || echo fail
EOF
chmod +x "$work/one.sh"
export IPMI_PASSWORD=secret

# Runs "$@" in the namespace; prints "wall cpu ok_count".
measure() {
    local out=$work/out tf=$work/time
    /usr/bin/time -f "%e %U %S" -o "$tf" ip netns exec "$ns" "$@" > "$out" 2>/dev/null || true
    # The last line: GNU time puts "Command exited with non-zero status" before it.
    local ok
    ok=$(grep -c -E ': (on|off)$|^ok$' "$out" || true)
    tail -n 1 "$tf" | awk -v ok="$ok" '{printf "%s %.2f %s\n", $1, $2 + $3, ok}'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A W C K
run() {
    local name=$1; shift
    W[$name]=-; C[$name]=-; K[$name]=-
    case " $METHODS " in *" $name "*) ;; *) return 0 ;; esac
    local ws=() cs=() ks=()
    for _ in $(seq 1 "$REPEAT"); do
        read -r w c k < <(measure "$@")
        ws+=("$w"); cs+=("$c"); ks+=("$k")
    done
    W[$name]=$(printf '%s\n' "${ws[@]}" | median)
    C[$name]=$(printf '%s\n' "${cs[@]}" | median)
    K[$name]=$(printf '%s\n' "${ks[@]}" | median)
}

run si sh -c "'$SI_POWER' status 'b[001-$(printf %03d "$NODES")]' --bmc-file '$work/bmc.toml' --timeout $TIMEOUT --fanout $FANOUT"
run xargs sh -c "xargs -P $FANOUT -L 1 '$work/one.sh' < '$work/targets'"
run loop sh -c "while read -r h p; do '$work/one.sh' \"\$h\" \"\$p\"; done < '$work/targets'"

echo
echo "si-power status: $NODES BMCs ($reach on $SIMS ipmi_sim, $unreach unreachable), timeout ${TIMEOUT}s, fanout $FANOUT, median of $REPEAT"
printf '%-28s %10s %10s %8s\n' method wall_s cpu_s answered
printf '%-28s %10s %10s %8s\n' "si-power (native RMCP+)" "${W[si]}" "${C[si]}" "${K[si]}"
printf '%-28s %10s %10s %8s\n' "ipmitool | xargs -P $FANOUT" "${W[xargs]}" "${C[xargs]}" "${K[xargs]}"
printf '%-28s %10s %10s %8s\n' "ipmitool shell loop" "${W[loop]}" "${C[loop]}" "${K[loop]}"
