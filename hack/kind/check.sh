#!/usr/bin/env bash
# Asserts that the example pods got paired devices: for every running pod that uses a
# ResourceClaim allocated by Tandem (a result of driver tandem.dev in its status.allocation;
# pods of other DRA drivers in the same cluster are left alone), each container using such a
# claim must carry TANDEM_PAIRS, the same pairs in /var/run/tandem/topology.json, and every
# pair at the affinity level that the node's own optimal pairing gives that GPU (`tandem topo
# -o json` run in the node's plugin pod, e.g. PIX on both dgx-h100 and gke-a4). Exits non-zero
# on the first kind of failure it finds.
# Needs: kubectl, jq, and a cluster from hack/kind/up.sh.
set -euo pipefail
# shellcheck source=hack/kind/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require kubectl jq

# "namespace/name" of every ResourceClaim with a device allocated by ${DRIVER}.
tandem_claims=$(kc get resourceclaims -A -o json | jq -c --arg driver "${DRIVER}" '
  [.items[]
   | select(any(.status.allocation.devices.results[]?; .driver == $driver))
   | "\(.metadata.namespace)/\(.metadata.name)"]')

# One line per container of a running pod that uses one of those claims:
# namespace pod node container. A pod claim names its ResourceClaim directly
# (resourceClaimName) or through a template, whose generated claim's name is in
# status.resourceClaimStatuses.
targets=$(kc get pods -A -o json | jq -r --arg system "${NAMESPACE}" --argjson ours "${tandem_claims}" '
  ($ours | map({(.): true}) | add // {}) as $tandem
  | .items[]
  | select(.metadata.namespace != $system and .status.phase == "Running")
  | . as $pod
  | ([.status.resourceClaimStatuses[]? | select(.resourceClaimName != null)
      | {key: .name, value: .resourceClaimName}] | from_entries) as $generated
  | [.spec.resourceClaims[]?
     | (.resourceClaimName // $generated[.name]) as $claim
     | select($claim != null and $tandem["\($pod.metadata.namespace)/\($claim)"] == true)
     | .name] as $pod_claims
  | select($pod_claims | length > 0)
  | .spec.containers[]
  | select(any(.resources.claims[]?; .name as $used | any($pod_claims[]; . == $used)))
  | "\($pod.metadata.namespace) \($pod.metadata.name) \($pod.spec.nodeName) \(.name)"')
[[ -n "${targets}" ]] \
  || die "no running pod uses a ResourceClaim allocated by ${DRIVER}; run hack/kind/up.sh first"

# Compares one container's env pairs and topology file with the node's optimal pairing;
# prints one line per problem.
problems_of() {
  local env_pairs="$1" topology="$2" node_topology="$3"
  jq -rn --arg env "${env_pairs}" --argjson file "${topology}" --argjson node "${node_topology}" '
    def pair_text: "\(.gpu)=\(.nic):\(.affinity)";
    ($env | split(",") | map(select(. != ""))
      | map(capture("^(?<gpu>[^=]+)=(?<nic>[^:]+):(?<affinity>.+)$"))) as $env_pairs
    | ($node.pairs | map({(.gpu): .affinity}) | add // {}) as $best
    | ([$env_pairs[] | pair_text] | sort) as $from_env
    | ([($file.pairs // [])[] | pair_text] | sort) as $from_file
    | (if $from_env != $from_file
       then "TANDEM_PAIRS (\($from_env | join(","))) differs from topology.json (\($from_file | join(",")))"
       else empty end),
      ($env_pairs[] | select($best[.gpu] != .affinity)
       | "\(.gpu) is paired with \(.nic) at \(.affinity); the node pairs it at \($best[.gpu] // "no level")")'
}

node_topology_cache_dir=$(mktemp -d)
trap 'rm -rf "${node_topology_cache_dir}"' EXIT
node_topology() {
  local node="$1" cache="${node_topology_cache_dir}/$1.json" plugin
  if [[ ! -s "${cache}" ]]; then
    plugin=$(kc -n "${NAMESPACE}" get pods -l app.kubernetes.io/name=tandem-node \
      --field-selector "spec.nodeName=${node}" -o jsonpath='{.items[0].metadata.name}')
    [[ -n "${plugin}" ]] || die "no tandem-node pod on node ${node}"
    kc -n "${NAMESPACE}" exec "${plugin}" -- /tandem topo -o json > "${cache}"
  fi
  cat "${cache}"
}

failures=0
pairs_seen=0
while read -r namespace pod node container <&3; do
  where="${namespace}/${pod} [${container}] on ${node}"
  if ! env_pairs=$(kc -n "${namespace}" exec "${pod}" -c "${container}" -- printenv TANDEM_PAIRS); then
    log "FAIL ${where}: no TANDEM_PAIRS in the container environment (was the claim prepared by ${DRIVER}?)"
    failures=$((failures + 1))
    continue
  fi
  if ! topology=$(kc -n "${namespace}" exec "${pod}" -c "${container}" -- cat /var/run/tandem/topology.json); then
    log "FAIL ${where}: /var/run/tandem/topology.json is not mounted"
    failures=$((failures + 1))
    continue
  fi
  nics=$(kc -n "${namespace}" exec "${pod}" -c "${container}" -- printenv TANDEM_NICS || true)
  if [[ -z "${env_pairs}" ]]; then
    if [[ -n "${nics}" ]]; then
      log "FAIL ${where}: GPUs and NICs (${nics}) but no pairs"
      failures=$((failures + 1))
    else
      log "ok   ${where}: no NIC in the claim, nothing to pair"
    fi
    continue
  fi
  # Separate assignments so that a failure (die) in the subshell stops the script.
  node_json=$(node_topology "${node}")
  problems=$(problems_of "${env_pairs}" "${topology}" "${node_json}")
  if [[ -n "${problems}" ]]; then
    while read -r problem; do log "FAIL ${where}: ${problem}"; done <<<"${problems}"
    failures=$((failures + 1))
  else
    log "ok   ${where}: ${env_pairs}"
  fi
  pairs_seen=$((pairs_seen + $(tr ',' '\n' <<<"${env_pairs}" | grep -c .)))
done 3<<<"${targets}"

[[ "${failures}" -eq 0 ]] || die "${failures} container(s) without the pairs they should have"
[[ "${pairs_seen}" -gt 0 ]] || die "no example pod holds a GPU-NIC pair"
log "all example pods got their GPUs paired at the best level their node offers (${pairs_seen} pairs)"
