#!/bin/sh
# TFTP throughput: a 50 MB file from si-bootd vs tftpd-hpa (in.tftpd run by hand), same client
# (atftp) and options, server and client in two network namespaces (10.213.50.0/24) joined by
# a veth pair. Prints the median of RUNS runs (default 3) per case. Needs root, tftpd-hpa, atftp.
set -eu
RUNS=${RUNS:-3}
SIZE_MB=${SIZE_MB:-50}
cd "$(dirname "$0")/.."
cargo build --release -q -p si-server --bin si-bootd
BOOTD=$PWD/target/release/si-bootd

S=si-tb$$-s
C=si-tb$$-c
DIR=$(mktemp -d /dev/shm/si-bench-tftp.XXXXXX)
cleanup() {
    for ns in $S $C; do
        ip netns pids $ns 2>/dev/null | xargs -r kill 2>/dev/null || true
        ip netns del $ns 2>/dev/null || true
    done
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
ip netns add $S
ip netns add $C
ip link add tbs$$ netns $S type veth peer name tbc$$ netns $C
ip -n $S addr add 10.213.50.1/24 dev tbs$$
ip -n $C addr add 10.213.50.2/24 dev tbc$$
for ns in $S $C; do ip -n $ns link set lo up; done
ip -n $S link set tbs$$ up
ip -n $C link set tbc$$ up

mkdir "$DIR/root"
head -c $((SIZE_MB * 1024 * 1024)) /dev/urandom > "$DIR/root/big"

ip netns exec $S "$BOOTD" --tftp-root "$DIR/root" --tftp-listen 10.213.50.1:69 \
    --http-listen 10.213.50.1:8080 2>"$DIR/bootd.log" &
ip netns exec $S in.tftpd -L -a 10.213.50.1:1069 -s "$DIR/root" &
sleep 1

# run PORT OPTIONS... -> seconds for one transfer (checked against the source)
one() {
    port=$1; shift
    rm -f "$DIR/out"
    t0=$(date +%s.%N)
    ip netns exec $C atftp "$@" -g -r big -l "$DIR/out" 10.213.50.1 "$port" >/dev/null 2>&1
    t1=$(date +%s.%N)
    cmp -s "$DIR/root/big" "$DIR/out" || { echo "transfer from port $port ($*) is corrupt" >&2; exit 1; }
    echo "$t1 - $t0" | bc -l
}

case_() {
    name=$1; shift
    times=""
    for _ in $(seq "$RUNS"); do times="$times $(one "$@")"; done
    med=$(echo $times | tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    printf '%-45s median %6.2f s  %6.1f MB/s   runs:%s\n' "$name" "$med" "$(echo "$SIZE_MB / $med" | bc -l)" "$times"
}

echo "TFTP ${SIZE_MB} MB, atftp client, $RUNS runs each"
case_ "tftpd-hpa blksize 1432"              1069 --option "blksize 1432"
case_ "si-bootd  blksize 1432"              69   --option "blksize 1432"
case_ "si-bootd  blksize 1432 windowsize 4"  69   --option "blksize 1432" --option "windowsize 4"
case_ "si-bootd  blksize 1432 windowsize 16" 69   --option "blksize 1432" --option "windowsize 16"
echo "(tftpd-hpa 5.2 has no windowsize option)"
