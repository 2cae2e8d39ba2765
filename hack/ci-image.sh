#!/usr/bin/env bash
# CI step: builds the container image without a container engine (hack/build-image.sh, umoci
# and skopeo from Debian) and checks it: config as the Dockerfile says, `tandem version` run
# inside it with its own libraries, the DaemonSet's `hook install` copying its /tandem.
# The binary is $TANDEM_BINARY, else the product build without the `demo` feature (no fixtures,
# no apiserver fake), in the debug profile so that it reuses the dependencies `cargo test`
# compiled, with its debug info stripped; the check then also proves that the shipped binary
# has no `demo` subcommand. Installs umoci, skopeo and binutils with apt-get when missing and
# running as root; otherwise, outside CI=true, it says why it skips.
set -euo pipefail
cd "$(dirname "$0")/.."
start=${SECONDS}

needed=()
command -v umoci >/dev/null 2>&1 || needed+=(umoci)
command -v skopeo >/dev/null 2>&1 || needed+=(skopeo)
command -v objdump >/dev/null 2>&1 || needed+=(binutils)
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || needed+=(debian-archive-keyring)
if [[ ${#needed[@]} -gt 0 ]]; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing ${needed[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${needed[@]}" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${needed[@]}" >/dev/null; }
  elif [[ "${CI:-}" == "true" ]]; then
    echo "ci-image: ${needed[*]} missing and not root: cannot install them" >&2
    exit 1
  else
    echo "== image check skipped: ${needed[*]} missing (apt-get install ${needed[*]})"
    exit 0
  fi
fi

out=target/image
binary="${TANDEM_BINARY:-}"
if [[ -z "${binary}" ]]; then
  echo "== cargo build --locked --no-default-features --bin tandem (the product binary)"
  cargo build --locked --no-default-features --bin tandem
  mkdir -p "${out}"
  objcopy --strip-debug "${CARGO_TARGET_DIR:-target}/debug/tandem" "${out}/tandem-debug-stripped"
  binary="${out}/tandem-debug-stripped"
  if "${binary}" demo --help >/dev/null 2>&1; then
    echo "ci-image: the product binary still has the demo subcommand" >&2
    exit 1
  fi
  # The test doubles live in the tandem-testkit crate: neither the dependency graph nor the
  # binary's symbols may hold it.
  if cargo tree --locked -p tandem --no-default-features -e normal --prefix none | grep -q '^tandem-testkit '; then
    echo "ci-image: the product build depends on tandem-testkit (the test doubles)" >&2
    exit 1
  fi
  if nm "${binary}" | grep -q 'tandem_testkit'; then
    echo "ci-image: the product binary has tandem_testkit symbols" >&2
    exit 1
  fi
fi
args=(--out "${out}" --archive docker
  --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)")
[[ -n "${binary}" ]] && args+=(--binary "${binary}")
bash hack/build-image.sh "${args[@]}"
rm -f "${out}/tandem-debug-stripped"
echo "== image step took $((SECONDS - start)) s"
