#!/usr/bin/env bash
# Node agent footprint (issue 16): builds `tandem` as the image ships it (the `node` profile,
# --no-default-features so no test doubles, and the Dockerfile builder's RUSTFLAGS), reports
# its size and build time, then its idle RSS on the dgx-h100 fixture (with what it is made
# of, from smaps) and RSS after N prepare/unprepare cycles of one 8 GPU + 8 NIC claim over the
# kubelet socket (default 10000; first argument), and idle again 15 s after them; twice, with
# the binary first out of the page cache, then read into it. Prints Markdown for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-10000}"
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(date -u +%Y-%m-%d), load $(cut -d' ' -f1-3 /proc/loadavg)"
# --target as the Dockerfile passes it (its RUSTFLAGS link glibc statically, which cargo
# applies to proc-macros too without one): the binary is then under target/<dir>/<host>/node.
host=$(rustc --print host-tuple)
flags=(--profile node --no-default-features --target "$host")
rustflags=$(bash hack/dockerfile-rustflags.sh)
# A target dir of its own: other RUSTFLAGS would rebuild the default target's dependencies.
target=target/footprint
what="node profile, --no-default-features (no test doubles), --target $host, RUSTFLAGS='$rustflags'"
start=$(date +%s)
RUSTFLAGS="$rustflags" cargo build --quiet --bin tandem --target-dir "$target" "${flags[@]}"
built=$(( $(date +%s) - start ))
binary="$target/$host/node/tandem"
size=$(stat -c %s "$binary")
echo
echo "| node agent binary | value |"
echo "|---|---:|"
echo "| build | $what |"
echo "| size | $size bytes ($(awk -v s="$size" 'BEGIN {printf "%.1f MB", s/1e6}')) |"
echo "| build time (incremental from what $target held) | ${built} s |"
# hack/link-hot-first.sh's count, from the order file it left beside the linked binary (of
# which the binary is a hard link).
linked=$(find "$target/$host/node/deps" -maxdepth 1 -samefile "$binary" | head -1)
order="$linked.hot-order"
if [[ -n "$linked" && -f "$order" ]]; then
  echo "| hot functions placed first (hack/hot-functions.txt) | $(head -1 "$order" | sed 's/^# \([0-9]* of [0-9]*\).*/\1/') |"
else
  echo "| hot functions placed first (hack/hot-functions.txt) | none: linked without order |"
fi
echo
# The apiserver fake over HTTPS with HTTP/2, as a node's apiserver (TANDEM_BENCH_APISERVER_TLS=0:
# plain HTTP/1.1, as the figures before the seventh session in BENCHMARKS.md).
export TANDEM_BENCH_APISERVER_TLS="${TANDEM_BENCH_APISERVER_TLS:-1}"
echo "Apiserver fake: $([[ $TANDEM_BENCH_APISERVER_TLS == 1 ]] && echo "HTTPS, HTTP/2" || echo "plain HTTP/1.1")"
echo
# The binary's pages that RSS counts depend on what the page cache holds of it: the kernel maps
# up to 16 cached pages around each page a fault touches (fault-around). So two runs: the
# binary dropped from the page cache first (as at a node's first start after a reboot), then
# read whole into it first (as right after the image was pulled, or when another process
# read it).
for cache in dropped cached; do
  sync "$binary"
  dd if="$binary" iflag=nocache count=0 status=none
  [[ "$cache" == cached ]] && cat "$binary" >/dev/null
  echo "Binary's pages in the page cache at start: $cache ($(fincore --noheadings --output RES "$binary" 2>/dev/null | tr -d ' ' || echo '?'))"
  echo
  TANDEM_PLUGIN_BIN="$(pwd)/$binary" TANDEM_BENCH_FOOTPRINT_CYCLES="$cycles" \
    cargo bench --quiet --bench plugin 2>/dev/null
  echo
done
