#!/usr/bin/env bash
# Brings up a kind cluster whose two workers pretend to be GPU machines (fixture sysfs trees
# written by `tandem fixture`), installs Tandem from deploy/overlays/kind, runs the examples
# from deploy/examples and waits until they run. Re-running it rebuilds and reloads the image.
# Needs: docker, kind (0.20+), kubectl, jq. Then: hack/kind/check.sh; hack/kind/down.sh.
set -euo pipefail
# shellcheck source=hack/kind/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require docker kind kubectl jq

log "building ${IMAGE}"
docker build \
  --build-arg "REVISION=$(git -C "${REPO_ROOT}" rev-parse HEAD 2>/dev/null || echo unknown)" \
  -t "${IMAGE}" "${REPO_ROOT}"

# The image writes the fixtures, so this works wherever docker does (Linux or a Mac).
# Contents are replaced but the directories kept: a running kind node bind-mounts them.
write_fixture() {
  local dir="$1" machine="$2"
  mkdir -p "${dir}"
  rm -rf "${dir:?}/sys" "${dir:?}/proc" "${dir:?}/dev"
  log "writing fixture ${machine} to ${dir}"
  docker run --rm --user "$(id -u):$(id -g)" -v "${dir}:/out" "${IMAGE}" \
    fixture "${machine}" --out /out
}
write_fixture "${FIXTURES_DIR}/worker" "${FIXTURE_WORKER}"
write_fixture "${FIXTURES_DIR}/worker2" "${FIXTURE_WORKER2}"

existed=false
if kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  existed=true
  log "cluster ${CLUSTER} exists; reusing it"
else
  sed "s|__FIXTURES__|${FIXTURES_DIR}|g" "${KIND_DIR}/cluster.yaml" > "${WORK_DIR}/cluster.yaml"
  log "creating cluster ${CLUSTER} (${NODE_IMAGE})"
  kind create cluster --name "${CLUSTER}" --image "${NODE_IMAGE}" \
    --config "${WORK_DIR}/cluster.yaml" --wait 120s
fi

log "loading ${IMAGE} into the nodes"
kind load docker-image "${IMAGE}" --name "${CLUSTER}"

log "installing deploy/overlays/kind"
kc apply -k "${REPO_ROOT}/deploy/overlays/kind"
if [[ "${existed}" == true ]]; then
  # Same tag, new image: only a restart makes the pods use it.
  kc -n "${NAMESPACE}" rollout restart daemonset/tandem-node deployment/tandem-controller
fi
kc -n "${NAMESPACE}" rollout status daemonset/tandem-node --timeout=180s
kc -n "${NAMESPACE}" rollout status deployment/tandem-controller --timeout=180s

log "waiting for both workers to publish ResourceSlices"
workers=$(kc get nodes -l tandem.dev/accelerators=true -o name | wc -l)
for _ in $(seq 1 60); do
  nodes_with_slices=$(kc get resourceslices \
    --field-selector "spec.driver=${DRIVER}" \
    -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' | sort -u | grep -c . || true)
  [[ "${nodes_with_slices}" -ge "${workers}" ]] && break
  sleep 2
done
[[ "${nodes_with_slices}" -ge "${workers}" ]] \
  || die "only ${nodes_with_slices} of ${workers} nodes published slices; see: kubectl --context ${CONTEXT} -n ${NAMESPACE} logs ds/tandem-node"
kc get resourceslices --field-selector "spec.driver=${DRIVER}"

examples="${REPO_ROOT}/deploy/examples"

# The example pods applied so far ("pod/NAME"), the ones up.sh waits for: pods of other
# DRA drivers in a reused cluster are none of its business.
example_pods=()
apply_example() {
  local file="$1" object
  log "running ${file#"${REPO_ROOT}/"}"
  while read -r object; do
    if [[ "${object}" == pod/* ]]; then
      example_pods+=("${object}")
    fi
  done < <(kc apply -f "${file}" -o name)
}

# Waits until every example pod runs; fails naming the ones that do not.
wait_for_example_pods() {
  local pending=""
  [[ "${#example_pods[@]}" -gt 0 ]] || return 0
  for _ in $(seq 1 90); do
    pending=$(kc get "${example_pods[@]}" -o json | jq -r '
      (if .kind == "List" then .items[] else . end)
      | select(.status.phase != "Running" and .status.phase != "Succeeded")
      | "\(.metadata.namespace)/\(.metadata.name)"')
    [[ -z "${pending}" ]] && return 0
    sleep 2
  done
  log "pods not running (their events say why):"
  while read -r stuck; do log "  ${stuck}"; done <<<"${pending}"
  die "examples did not start; try: kubectl --context ${CONTEXT} describe pod -n NAMESPACE NAME"
}

if [[ -d "${examples}" ]]; then
  # Whole-node claims first: placed after the smaller ones, they could find every node
  # partly taken and stay pending.
  # (Loops over the files rather than mapfile: macOS still ships bash 3.2.)
  for file in "${examples}"/*.yaml; do
    if grep -q 'allocationMode: All' "${file}"; then
      apply_example "${file}"
    fi
  done
  wait_for_example_pods
  for file in "${examples}"/*.yaml; do
    if ! grep -q 'allocationMode: All' "${file}"; then
      apply_example "${file}"
    fi
  done
  wait_for_example_pods
else
  log "no deploy/examples directory; skipping the examples"
fi
log "ready: kubectl config use-context ${CONTEXT}; then hack/kind/check.sh"
