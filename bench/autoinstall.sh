#!/bin/bash
# Answer-file rendering benchmark: NODES nodes (default 1000) with the shipped Debian preseed
# extended to include SNIPPETS global snippets (default 10), each rendered ROUNDS times (default
# 10: 10,000 answer files) by `si-profile check --repeat`, the code path si-server's HTTP
# route runs per request (inventory lookup, leases, variables, snippet loader, minijinja).
# Prints the time and the peak memory (/usr/bin/time).
#
#   bench/autoinstall.sh                  the rendering figures (no root needed)
#   sudo DHCP=1 bench/autoinstall.sh      then bench/dhcp.sh (si only) at RATE DHCP requests/s
#                                         without, and with, a rendering loop running beside it
#
# Needs `cargo build --release -p si-server --bins` (BINDIR, default target/release) and
# /usr/bin/time; DHCP=1 needs what bench/dhcp.sh needs (root, kea-admin, kea-dhcp4-server,
# dnsmasq-base).
set -euo pipefail

NODES=${NODES:-1000}
ROUNDS=${ROUNDS:-10}
SNIPPETS=${SNIPPETS:-10}
RATE=${RATE:-1000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BINDIR:-$ROOT/target/release}
WORK=$(mktemp -d /tmp/si-bench-autoinstall.XXXXXX)
LOOP=
cleanup() {
    if [ -n "$LOOP" ]; then kill "$LOOP" 2>/dev/null || true; wait "$LOOP" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
for t in si-distro si-profile si-node si-group; do
    [ -x "$BIN/$t" ] || { echo "missing: $BIN/$t (cargo build --release -p si-server --bins)" >&2; exit 1; }
done

S=(--state-dir "$WORK/state")
# A debian-installer netboot tree (kernel and initrd are never read by the renderer).
mkdir -p "$WORK/tree/debian-installer/amd64"
echo kernel >"$WORK/tree/debian-installer/amd64/linux"
echo initrd >"$WORK/tree/debian-installer/amd64/initrd.gz"
"$BIN/si-distro" "${S[@]}" import --name deb12 --path "$WORK/tree" >/dev/null

# The shipped snippets, plus generated ones up to SNIPPETS includes per file.
ex=$ROOT/images/autoinstall
for f in "$ex"/snippets/*; do
    "$BIN/si-profile" "${S[@]}" snippet add "$(basename "$f")" --file "$f"
done
cp "$ex/debian12.preseed" "$WORK/template"
for i in $(seq 3 "$SNIPPETS"); do
    cat >"$WORK/snip$i" <<EOF
# snippet $i for {{ hostname }} ({{ node }}) at {{ ip }}, {{ macs | join(",") }}
{% for d in disks %}# disk {{ d }} of {{ vars.site | default("site") }}
{% endfor %}d-i preseed/include_command string true # {{ distro.name }} {{ distro.arch }} {{ server_url }}
EOF
    "$BIN/si-profile" "${S[@]}" snippet add "snip$i" --file "$WORK/snip$i"
    echo "{% include \"snip$i\" %}" >>"$WORK/template"
done
"$BIN/si-profile" "${S[@]}" add --name bench --distro deb12 --template "$WORK/template" \
    --var mirror_host=deb.debian.org --var disks=vda,vdb >/dev/null
"$BIN/si-node" "${S[@]}" subnet add bench --network 10.213.0.0/16 >/dev/null 2>&1
"$BIN/si-group" "${S[@]}" add compute --profile bench >/dev/null 2>&1
"$BIN/si-node" "${S[@]}" add "node[1-$NODES]" --mac 52:54:00:10:00:00 --ip 10.213.1.1 \
    --group compute --action autoinstall >/dev/null 2>&1

render() {
    "$BIN/si-profile" "${S[@]}" check --http-base http://10.213.0.1:8080 --repeat "$1"
}
one=$(render 1 | head -1)
echo "check: $one"
out=$( { /usr/bin/time -f '%e %U %S %M' "$BIN/si-profile" "${S[@]}" check \
    --http-base http://10.213.0.1:8080 --repeat "$ROUNDS" >"$WORK/check.out"; } 2>&1 )
read -r wall user sys rss <<<"$out"
echo "render: $(cat "$WORK/check.out")"
printf 'render: %d files (%d nodes x %d rounds, %d snippets each): wall %s s, cpu %.2f s, peak RSS %s KiB\n' \
    $((NODES * ROUNDS)) "$NODES" "$ROUNDS" "$SNIPPETS" "$wall" "$(echo "$user + $sys" | bc)" "$rss"

[ "${DHCP:-0}" = 1 ] || exit 0
echo "DHCP without a rendering load (si-dhcpd, $RATE/s):"
SERVERS=si "$ROOT/bench/dhcp.sh" "$RATE"
# The loop stops its renderer before it exits, so that nothing renders while $WORK goes away.
(
    c=
    trap 'if [ -n "$c" ]; then kill "$c" 2>/dev/null; wait "$c" 2>/dev/null; fi; exit 0' TERM
    while true; do
        "$BIN/si-profile" "${S[@]}" check --http-base http://10.213.0.1:8080 \
            --repeat "$ROUNDS" >>"$WORK/loop.out" &
        c=$!
        wait "$c"
    done
) &
LOOP=$!
echo "DHCP with a rendering loop beside it (si-profile check --repeat $ROUNDS, continuously):"
SERVERS=si "$ROOT/bench/dhcp.sh" "$RATE"
echo "rendering loop: $(grep -c ', 0 failed,' "$WORK/loop.out" || true) complete runs of $((NODES * ROUNDS)) files during the DHCP runs, $(grep -vc ', 0 failed,' "$WORK/loop.out" || true) with failures"
