#!/usr/bin/env bash
# Every ftvm benchmark from a fresh clone: installs the peers and tools the benchmarks compare
# against (QEMU for QEMU/KVM and QEMU COLO, iperf3 for the link), builds, then runs
# `ftvm-bench all`, which writes benches/results/*.json and draws benches/results/plots/*.svg.
# Run as root (network namespaces, packages). Pass --quick for a short smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if ((${#need[@]})); then
    echo "==> installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release -p ftvm -p ftvm-benches
exec cargo run --release -p ftvm-benches -- all "$@"
