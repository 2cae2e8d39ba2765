#!/usr/bin/env bash
# Discovery + pairing benchmark: prints the Markdown table for BENCHMARKS.md, headed by the
# machine it ran on. Run on an otherwise idle machine; each row is a median over many runs.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(date -u +%Y-%m-%d)"
echo
cargo bench --quiet --bench topology 2>/dev/null
