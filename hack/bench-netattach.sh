#!/usr/bin/env bash
# Exclusive NIC attach benchmark: prints the Markdown tables for BENCHMARKS.md, headed by the
# machine it ran on. Needs root and `ip netns` (it prints why and exits 0 otherwise); builds
# the release `tandem` binary the hook runs. TANDEM_BENCH_ITERATIONS sets the rounds (200).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(date -u +%Y-%m-%d), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
# stderr stays: a skipped run says why there.
cargo bench --quiet --bench netattach
