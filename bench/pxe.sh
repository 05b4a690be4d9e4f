#!/bin/sh
# Seconds from VM start to the test initramfs printing its marker (BIOS, iPXE ROM, TCG):
#   si-bootd with kernel/initrd over HTTP, si-bootd with everything over TFTP, and the same
#   boot served by dnsmasq's own TFTP (DHCP by dnsmasq in these three); then si-server alone,
#   DHCP included.
# Runs the ignored test `bench_pxe` in tests/tests/pxe_qemu.rs; RUNS (default 1) boots each.
# Needs root and the packages listed in that file.
set -eu
cd "$(dirname "$0")/.."
cargo build --release -q --workspace --bins
SI_BENCH_RUNS=${RUNS:-1} cargo test --release -q -p si-tests --test pxe_qemu -- \
    --ignored --nocapture --exact bench_pxe 2>&1 | grep -E '^BENCH|panicked|FAILED'
