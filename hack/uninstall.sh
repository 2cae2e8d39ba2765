#!/usr/bin/env bash
# Removes Tandem from a cluster completely (docs/install.md, "Uninstall"):
#   1. refuses while a ResourceClaim allocated by tandem.dev still exists (its pod would lose
#      the plugin that unprepares it; --force goes on anyway);
#   2. kubectl delete -k OVERLAY: the plugin DaemonSet, the controller, RBAC, the admission
#      policy, the DeviceClasses and the tandem-system namespace, waiting until they are gone;
#   3. deletes tandem.dev's ResourceSlices (the kubelet would, some 30 s later);
#   4. removes the controller's node labels tandem.dev/{gpus,rdma-nics,best-affinity} and the
#      annotation tandem.dev/alignment from every node;
#   5. runs deploy/uninstall/host-cleanup.yaml, one pod per node that removes /var/lib/tandem,
#      /opt/tandem, Tandem's kubelet sockets and CDI specs, waits for all of them, then
#      deletes it (--keep-host-files skips this step).
# Needs: kubectl pointed at the cluster. Settings: TANDEM_CLEANUP_IMAGE (busybox:1.37; any
# image with a POSIX sh and rm, e.g. a mirror for air-gapped clusters).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRIVER=tandem.dev
CLEANUP_MANIFEST="${REPO_ROOT}/deploy/uninstall/host-cleanup.yaml"
CLEANUP_NAMESPACE=tandem-uninstall
CLEANUP_DAEMONSET=tandem-host-cleanup
CLEANUP_IMAGE="${TANDEM_CLEANUP_IMAGE:-busybox:1.37}"
NODE_LABELS=(tandem.dev/gpus tandem.dev/rdma-nics tandem.dev/best-affinity)
NODE_ANNOTATIONS=(tandem.dev/alignment)

overlay="${REPO_ROOT}/deploy/overlays/production"
context=()
force=false
host_files=true
timeout=300s

usage() {
  cat <<EOF
usage: $(basename "$0") [-k OVERLAY] [--context NAME] [--timeout DURATION] [--force] [--keep-host-files]
  -k OVERLAY         the kustomize directory Tandem was installed from
                     (default deploy/overlays/production; every overlay names the same objects)
  --context NAME     kubectl context (default: the current one)
  --timeout DURATION how long to wait for deletions and the per-node cleanup (default 300s)
  --force            go on although claims allocated by ${DRIVER} still exist
  --keep-host-files  leave the files on the nodes
EOF
}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -k) [[ $# -ge 2 ]] || die "-k needs a directory"; overlay="$2"; shift 2 ;;
    --context) [[ $# -ge 2 ]] || die "--context needs a name"; context=(--context "$2"); shift 2 ;;
    --timeout) [[ $# -ge 2 ]] || die "--timeout needs a duration"; timeout="$2"; shift 2 ;;
    --force) force=true; shift ;;
    --keep-host-files) host_files=false; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument $1" ;;
  esac
done

command -v kubectl >/dev/null 2>&1 || die "kubectl is not installed"
[[ -d "${overlay}" ]] || die "${overlay} is not a kustomize directory"
# (The + form: bash 3.2, still macOS's, calls an empty array unbound under set -u.)
kc() { kubectl ${context[@]+"${context[@]}"} "$@"; }

# 1. Claims still allocated by the driver: "namespace/name driver driver ..." per claim.
in_use=$(kc get resourceclaims -A -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name} {.status.allocation.devices.results[*].driver}{"\n"}{end}' \
  | awk -v driver="${DRIVER}" '{ for (i = 2; i <= NF; i++) if ($i == driver) { print $1; break } }')
if [[ -n "${in_use}" ]]; then
  log "ResourceClaims still allocated by ${DRIVER} (delete their pods first):"
  while read -r claim; do log "  ${claim}"; done <<<"${in_use}"
  [[ "${force}" == true ]] || die "refusing to uninstall while claims are in use; --force to go on"
  log "--force: going on; those pods keep what they have, nothing will unprepare it"
fi

# 2. The installed objects. Waiting makes sure no plugin pod writes slices, sockets or files
# and no controller writes labels after the steps below.
log "deleting the objects of ${overlay#"${REPO_ROOT}/"}"
kc delete -k "${overlay}" --ignore-not-found --wait=true --timeout="${timeout}"

# 3. Slices: the kubelet wipes them some 30 s after the plugin left; do not wait for it.
log "deleting ResourceSlices of ${DRIVER}"
kc delete resourceslices --field-selector "spec.driver=${DRIVER}" --ignore-not-found

# 4. What the controller wrote on the nodes. A key that is not there is only a warning.
log "removing node labels ${NODE_LABELS[*]} and annotations ${NODE_ANNOTATIONS[*]}"
kc label nodes --all "${NODE_LABELS[@]/%/-}" >/dev/null
kc annotate nodes --all "${NODE_ANNOTATIONS[@]/%/-}" >/dev/null

# 5. Host files, one pod per node.
if [[ "${host_files}" == false ]]; then
  log "--keep-host-files: leaving /var/lib/tandem, /opt/tandem, the kubelet sockets and CDI specs"
  exit 0
fi
log "removing Tandem's files on every node (image ${CLEANUP_IMAGE})"
sed -E "s|^( *image: ).*$|\1${CLEANUP_IMAGE}|" "${CLEANUP_MANIFEST}" | kc apply -f -
cleaned=true
if ! kc -n "${CLEANUP_NAMESPACE}" rollout status "daemonset/${CLEANUP_DAEMONSET}" \
  --timeout="${timeout}"; then
  cleaned=false
  log "some nodes were not cleaned; their cleanup pods:"
  kc -n "${CLEANUP_NAMESPACE}" get pods -o wide || true
  kc -n "${CLEANUP_NAMESPACE}" logs -l "app.kubernetes.io/name=${CLEANUP_DAEMONSET}" -c clean \
    --prefix --tail=20 --max-log-requests=20 || true
fi
kc delete namespace "${CLEANUP_NAMESPACE}" --ignore-not-found --wait=true --timeout="${timeout}"
[[ "${cleaned}" == true ]] \
  || die "host files remain on the nodes above (unreachable or failing); see docs/install.md, Uninstall"
log "Tandem is uninstalled"
