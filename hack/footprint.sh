#!/usr/bin/env bash
# Node agent footprint (issue 16): builds the release `tandem` as a node runs it (without the
# test doubles, --no-default-features, once the `demo` feature exists), reports its size and
# build time, then its idle RSS on the dgx-h100 fixture and RSS after N prepare/unprepare
# cycles of one 8 GPU + 8 NIC claim over the kubelet socket (default 10000; first argument).
# Prints Markdown for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-10000}"
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(date -u +%Y-%m-%d), load $(cut -d' ' -f1-3 /proc/loadavg)"
if grep -qE '^demo *=' Cargo.toml; then
  flags=(--no-default-features)
  target=target/footprint
  what="release, --no-default-features (no test doubles)"
else
  flags=()
  target=target
  what="release, default features (test doubles still linked: no demo feature yet)"
fi
# A target dir of its own (the feature set differs), seeded with the default build's
# dependencies so only tandem itself is compiled.
if [ "$target" != target ] && [ ! -d "$target/release" ] && [ -d target/release ]; then
  mkdir -p "$target" && cp -a target/release "$target/"
fi
start=$(date +%s)
cargo build --quiet --release --bin tandem --target-dir "$target" "${flags[@]}"
built=$(( $(date +%s) - start ))
binary="$target/release/tandem"
size=$(stat -c %s "$binary")
echo
echo "| node agent binary | value |"
echo "|---|---:|"
echo "| build | $what |"
echo "| size | $size bytes ($(awk -v s="$size" 'BEGIN {printf "%.1f MB", s/1e6}')) |"
echo "| build time (incremental from what $target held) | ${built} s |"
echo
TANDEM_PLUGIN_BIN="$(pwd)/$binary" TANDEM_BENCH_FOOTPRINT_CYCLES="$cycles" \
  cargo bench --quiet --bench plugin 2>/dev/null
