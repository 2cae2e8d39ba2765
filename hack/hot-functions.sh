#!/usr/bin/env bash
# Writes hack/hot-functions.txt, the functions hack/link-hot-first.sh puts first in the node
# binary: those the plugin runs from start to idle on the dgx-h100 fixture, then those that
# prepare/unprepare cycles add (1200 by default: under valgrind they last long enough for the
# periodic work too, the 10 s netattach reconcile and the 30 s rescan). It builds the binary
# as hack/footprint.sh does but with its symbols, runs the footprint bench with the plugin
# under valgrind's callgrind, and asks callgrind for a dump once the plugin is idle and every
# half second after. Run it after changes that move start-up or prepare work; a stale list
# only costs resident pages.
# Needs valgrind (installed with apt-get when missing and root).
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-1200}"
if ! command -v valgrind >/dev/null 2>&1; then
  [[ "$(id -u)" == 0 ]] || { echo "hot-functions: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi
rustflags=$(bash hack/dockerfile-rustflags.sh)
target=target/hot-functions
# --target as the Dockerfile passes it (see hack/footprint.sh).
host=$(rustc --print host-tuple)
RUSTFLAGS="$rustflags" CARGO_PROFILE_NODE_STRIP=false \
  cargo build --quiet --bin tandem --target-dir "$target" --profile node --no-default-features --target "$host"
binary="$(pwd)/$target/$host/node/tandem"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/plugin" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --dump-instr=no --demangle=no --compress-strings=no \
  --compress-pos=no --callgrind-out-file="$work/out.%p" "$binary" "\$@"
EOF
chmod +x "$work/plugin"
# Against the fake serving HTTPS with HTTP/2, as a node's apiserver does: the TLS and HTTP/2
# client code a node runs is then in the list (TANDEM_BENCH_APISERVER_TLS=0: plain HTTP/1.1).
export TANDEM_BENCH_APISERVER_TLS="${TANDEM_BENCH_APISERVER_TLS:-1}"
TANDEM_PLUGIN_BIN="$work/plugin" TANDEM_BENCH_FOOTPRINT_CYCLES="$cycles" \
  cargo bench --quiet --bench plugin >"$work/bench.out" 2>&1 &
bench=$!
pid=""
socket=""
for _ in $(seq 1 1200); do
  pid=$(pgrep -f "callgrind-out-file=$work/" | head -1 || true)
  if [[ -n "$pid" && -z "$socket" ]]; then
    # This run's DRA socket, under the plugin's own --kubelet-plugins-dir.
    plugins=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | sed -n '/^--kubelet-plugins-dir$/{n;p;}' || true)
    [[ -n "$plugins" ]] && socket="$plugins/tandem.dev/dra.sock"
  fi
  [[ -n "$socket" && -S "$socket" ]] && break
  sleep 0.5
done
[[ -n "$socket" && -S "$socket" ]] || { cat "$work/bench.out" >&2; echo "hot-functions: the plugin did not listen" >&2; exit 1; }
# The bench waits 2 s after the socket listens before its first prepare.
sleep 1
while kill -0 "$pid" 2>/dev/null; do
  callgrind_control -d "$pid" >/dev/null 2>&1 || true
  sleep 0.5
done
wait "$bench" || { cat "$work/bench.out" >&2; echo "hot-functions: the bench failed" >&2; exit 1; }

# Functions of the tandem binary in one callgrind dump, without recursion marks ('2) and hashes.
functions() {
  awk -v binary="$binary" '
    /^ob=/ { object = substr($0, 4) }
    /^fn=/ && object == binary { name = substr($0, 4); sub(/\047[0-9]+$/, "", name); print name }
  ' "$@" | grep -v '^(below main)$' | grep -v '^0x' | hack/link-hot-first.sh --unhashed | sort -u
}
dumps=("$work"/out.*.*)
[[ -f "${dumps[0]}" ]] || { echo "hot-functions: callgrind dumped nothing" >&2; exit 1; }
# The first dump is start-up to idle; the later ones (numbered on) are the cycles'.
first=("$work"/out.*.1)
functions "${first[0]}" >"$work/start"
later=()
for dump in "${dumps[@]}"; do [[ "$dump" == "${first[0]}" ]] || later+=("$dump"); done
if [[ ${#later[@]} -gt 0 ]]; then functions "${later[@]}"; fi | comm -13 "$work/start" - >"$work/cycles"
{
  echo "# Written by hack/hot-functions.sh on $(date -u +%Y-%m-%d) (rustc $(rustc --version | cut -d' ' -f2), $(git rev-parse --short HEAD))."
  echo "# Read by hack/link-hot-first.sh. Symbol names without their hashes, in link order:"
  echo "# start-up to idle on dgx-h100, apiserver over $([[ $TANDEM_BENCH_APISERVER_TLS == 1 ]] && echo "HTTPS (HTTP/2)" || echo "plain HTTP/1.1") ($(wc -l <"$work/start") functions)"
  cat "$work/start"
  echo "# then what $cycles prepare/unprepare cycles add ($(wc -l <"$work/cycles") functions)"
  cat "$work/cycles"
} >hack/hot-functions.txt
echo "hack/hot-functions.txt: $(wc -l <"$work/start") start-up and $(wc -l <"$work/cycles") prepare/unprepare functions"
