#!/usr/bin/env bash
# Soak of `tandem plugin`: SIGKILLs, a flapping NIC port and a steady kubelet-like client for
# TANDEM_SOAK_SECONDS (default 120; the 30-minute figures in BENCHMARKS.md use 1800).
# Prints a Markdown table to paste into BENCHMARKS.md; fails on lost claims, leaks or RSS growth.
set -euo pipefail
cd "$(dirname "$0")/.."
export TANDEM_SOAK_SECONDS="${1:-${TANDEM_SOAK_SECONDS:-120}}"
echo "soak: ${TANDEM_SOAK_SECONDS} s on $(nproc) cores, $(uname -srm)" >&2
exec cargo test --release --test soak -- --nocapture
