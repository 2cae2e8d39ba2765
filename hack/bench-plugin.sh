#!/usr/bin/env bash
# Claim preparation benchmark (issue 16): prints the Markdown tables for BENCHMARKS.md, headed
# by the machine. `cargo bench --bench plugin` gives latency p50/p99 over the kubelet socket
# (sequential, 8 parallel calls, 8 claims in one call) and the flushes per call counted
# in-process; then `tandem demo` (one prepare + one unprepare) runs under strace, counting
# every fsync/fdatasync/sync_file_range/syncfs of the whole process, which must be at most 2.
# The demo's state and CDI directories are on whatever the demo picks (a scratch dir);
# flushes do not depend on the filesystem.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(date -u +%Y-%m-%d)"
echo
cargo bench --quiet --bench plugin 2>/dev/null
echo
if ! command -v strace >/dev/null; then
  echo "strace not installed: demo flush count skipped" >&2
  exit 0
fi
cargo build --quiet --release --bin tandem
trace=$(mktemp)
trap 'rm -f "$trace"' EXIT
strace -f -qq -e trace=fsync,fdatasync,sync_file_range,syncfs,sync -o "$trace" \
  target/release/tandem demo >/dev/null
flushes=$(grep -cE '(fsync|fdatasync|sync_file_range|syncfs|sync)\(' "$trace" || true)
echo "| \`tandem demo\` (one prepare + one unprepare), whole process | flushes |"
echo "|---|---:|"
echo "| fsync + fdatasync + sync_file_range + syncfs (strace -f) | $flushes |"
if [ "$flushes" -gt 2 ]; then
  echo "tandem demo made $flushes flushes, more than 2:" >&2
  cat "$trace" >&2
  exit 1
fi
