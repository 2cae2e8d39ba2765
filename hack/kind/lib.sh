# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables are used by the scripts that source this file
# Shared settings of the kind scripts (sourced, not run). Every value can be overridden from
# the environment.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KIND_DIR="${REPO_ROOT}/hack/kind"
CLUSTER="${TANDEM_KIND_CLUSTER:-tandem}"
CONTEXT="kind-${CLUSTER}"
IMAGE="${TANDEM_IMAGE:-tandem:dev}"
NODE_IMAGE="${TANDEM_KIND_NODE_IMAGE:-kindest/node:v1.34.0}"
# Generated files (rendered cluster config, fixture trees) live under target/, which git ignores.
WORK_DIR="${TANDEM_KIND_WORK_DIR:-${REPO_ROOT}/target/kind}"
FIXTURES_DIR="${WORK_DIR}/fixtures"
# Fixture machine per worker node, in the order of the workers in cluster.yaml.
FIXTURE_WORKER="${TANDEM_FIXTURE_WORKER:-dgx-h100}"
FIXTURE_WORKER2="${TANDEM_FIXTURE_WORKER2:-gke-a4}"
NAMESPACE=tandem-system
DRIVER=tandem.dev

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require() {
  local tool
  for tool in "$@"; do
    command -v "${tool}" >/dev/null 2>&1 || die "${tool} is not installed (needed by $(basename "$0"))"
  done
}

kc() { kubectl --context "${CONTEXT}" "$@"; }
