#!/usr/bin/env bash
# ResourceSlice publishing benchmark: prints the Markdown table for BENCHMARKS.md, headed by the
# machine it ran on. Publishes go to the in-process fake apiserver over loopback HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(date -u +%Y-%m-%d)"
echo
cargo bench --quiet --bench slices 2>/dev/null
