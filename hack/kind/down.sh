#!/usr/bin/env bash
# Deletes the kind cluster made by up.sh and the fixture trees it wrote.
set -euo pipefail
# shellcheck source=hack/kind/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require kind

kind delete cluster --name "${CLUSTER}"
rm -rf "${WORK_DIR}"
log "deleted cluster ${CLUSTER} and ${WORK_DIR}"
