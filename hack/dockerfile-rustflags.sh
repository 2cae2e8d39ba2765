#!/usr/bin/env bash
# Prints the RUSTFLAGS of the Dockerfile's builder stage (its `ENV RUSTFLAGS="..."` line), or
# nothing when it sets none. hack/build-image.sh, hack/footprint.sh and hack/hot-functions.sh
# build the node binary with them, so that they link the binary the image ships.
# Usage: hack/dockerfile-rustflags.sh [DOCKERFILE]   (default: the repository's)
set -euo pipefail
sed -n 's/^ENV RUSTFLAGS="\(.*\)"$/\1/p' "${1:-$(dirname "$0")/../Dockerfile}"
