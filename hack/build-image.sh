#!/usr/bin/env bash
# Builds the Tandem container image without a container engine, the same image the Dockerfile
# builds: a Debian bookworm root made from Debian packages (what gcr.io/distroless/cc-debian12
# is made from), /tandem on top, and the Dockerfile's own ENTRYPOINT, USER and LABELs. The
# Dockerfile's final stage is read, not repeated here: an instruction this script does not
# replicate, or another base image, stops the build. umoci writes the OCI layout, skopeo (if
# installed) the docker-archive tarball for `docker load` / `kind load image-archive`. Then the
# image is checked without an engine: unpacked, its config compared with the Dockerfile, its
# /tandem run with the image's own loader and libraries, and the DaemonSet's `hook install`
# run inside it. See docs/image.md.
#
# Usage: hack/build-image.sh [options]
#   --out DIR            output directory (default: target/image)
#   --binary PATH        use this tandem binary instead of `cargo build --profile node
#                        --no-default-features` (env TANDEM_BINARY)
#   --tag TAG            image tag (default: the Dockerfile's VERSION build arg)
#   --name NAME          image name inside the docker archive (default: tandem)
#   --build-arg K=V      as `docker build --build-arg` (VERSION, REVISION, SOURCE); repeatable
#   --archive KIND       docker | oci | all | none (default: docker when skopeo is installed)
#   --no-check           skip the checks on the built image
#   --dockerfile PATH    the Dockerfile to follow (default: the repository's)
#   --print-config       print, as JSON, what the image will hold (read from the Dockerfile) and exit
# Env: DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR (default deb.debian.org), SOURCE_DATE_EPOCH (default:
# the last commit's time; every timestamp in the image is set to it, so the same binary and the
# same Debian packages give the same image digest).
# Needs: python3, apt-get, dpkg-deb, GNU tar, umoci, objdump (binutils); skopeo for archives;
# root (or fakeroot-free rootless umoci) for the chroot checks, which otherwise run the binary
# through the image's loader directly.
set -euo pipefail
umask 022
export LC_ALL=C

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKERFILE="${REPO_ROOT}/Dockerfile"

# The Debian release under gcr.io/distroless/cc-debian12, and what of it the image carries.
# Libraries: only those the binary can link. It uses rustls, so no libssl, and no C++, so no
# libstdc++ or libgomp, which distroless cc adds; gcc-12-base holds libgcc-s1's copyright.
# Data: what distroless carries too and the binary may read: the CA bundle (kube's
# rustls-native-certs reads it), zoneinfo, /etc/services and friends, os-release.
SUITE=bookworm
EXPECTED_BASE="gcr.io/distroless/cc-debian12:nonroot"
LIBRARY_PACKAGES=(libc6 libgcc-s1 gcc-12-base)
DATA_PACKAGES=(base-files netbase tzdata ca-certificates)
# Base image config that the Dockerfile inherits from distroless (the :nonroot tag).
BASE_ENV=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
BASE_USER="65532"
BASE_WORKDIR="/home/nonroot"

OUT_DIR="${REPO_ROOT}/target/image"
BINARY="${TANDEM_BINARY:-}"
TAG=""
IMAGE_NAME="tandem"
ARCHIVE=""
CHECK=true
PRINT_CONFIG=false
BUILD_ARGS=()
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

log() { printf '== %s\n' "$*"; }
die() { printf 'build-image: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '/^# Usage:/,/^# Needs:/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --dockerfile) DOCKERFILE="$2"; shift 2 ;;
    --binary) BINARY="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    --name) IMAGE_NAME="$2"; shift 2 ;;
    --build-arg) BUILD_ARGS+=("$2"); shift 2 ;;
    --archive) ARCHIVE="$2"; shift 2 ;;
    --no-check) CHECK=false; shift ;;
    --print-config) PRINT_CONFIG=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage; die "unknown argument: $1" ;;
  esac
done

case "$(uname -m)" in
  x86_64) DEB_ARCH=amd64 OCI_ARCH=amd64 MULTIARCH=x86_64-linux-gnu ;;
  aarch64) DEB_ARCH=arm64 OCI_ARCH=arm64 MULTIARCH=aarch64-linux-gnu ;;
  *) die "unsupported machine $(uname -m)" ;;
esac

# The Dockerfile's final stage as JSON, with its ARGs expanded from --build-arg or their
# defaults, the way `docker build` does. Fails on anything this script does not replicate.
dockerfile_config() {
  python3 - "${DOCKERFILE}" "${EXPECTED_BASE}" "${BUILD_ARGS[@]+"${BUILD_ARGS[@]}"}" <<'PY'
import json, re, shlex, sys

path, expected_base, *overrides = sys.argv[1:]
given = dict(a.split("=", 1) for a in overrides)
logical, buf = [], ""
for raw in open(path, encoding="utf-8").read().splitlines():
    line = raw.strip()
    if line.startswith("#") or (not line and not buf):
        continue  # comments (also inside continuations, as Docker does) and blank lines
    if line.endswith("\\"):
        buf += line[:-1] + " "
        continue
    logical.append(buf + line)
    buf = ""
stages = []
for line in logical:
    word, _, rest = line.partition(" ")
    if word.upper() == "FROM":
        stages.append([])
    if stages:
        stages[-1].append((word.upper(), rest.strip()))
final = stages[-1]
args, cfg = {}, {"labels": {}, "copies": [], "env": [], "user": None, "workdir": None,
                 "entrypoint": None, "cmd": None}

def expand(s):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), s)

def pairs(rest):
    return [tuple(p.split("=", 1)) for p in shlex.split(rest)]

for word, rest in final:
    if word == "FROM":
        cfg["base"] = rest.split()[0]
    elif word == "ARG":
        name, _, default = rest.partition("=")
        args[name] = given.get(name, shlex.split(default)[0] if default else "")
    elif word == "LABEL":
        cfg["labels"].update({k: expand(v) for k, v in pairs(rest)})
    elif word == "ENV":
        cfg["env"] += [f"{k}={expand(v)}" for k, v in pairs(rest)]
    elif word == "USER":
        cfg["user"] = expand(rest)
    elif word == "WORKDIR":
        cfg["workdir"] = expand(rest)
    elif word in ("ENTRYPOINT", "CMD"):
        if not rest.startswith("["):
            sys.exit(f"{path}: {word} in shell form; the image needs the exec (JSON) form")
        cfg[word.lower()] = json.loads(rest)
    elif word == "COPY":
        parts = shlex.split(rest)
        flags = dict(p[2:].split("=", 1) for p in parts if p.startswith("--"))
        files = [p for p in parts if not p.startswith("--")]
        cfg["copies"].append({"from": flags.get("from"), "src": files[:-1], "dest": files[-1]})
    else:
        sys.exit(f"{path}: final stage has {word}, which hack/build-image.sh does not replicate")
base = cfg.get("base", "")
if base.split("@")[0] != expected_base:
    sys.exit(f"{path}: runtime base is {base}, hack/build-image.sh builds the equivalent of "
             f"{expected_base}: update its SUITE and package lists")
for c in cfg["copies"]:
    if c["from"] != "builder" or c["src"] != [c["dest"]]:
        sys.exit(f"{path}: COPY {c} is not the builder's binary; hack/build-image.sh copies only that")
cfg["build_args"] = args
print(json.dumps(cfg, indent=1, sort_keys=True))
PY
}

DF_JSON=$(dockerfile_config) || die "cannot use ${DOCKERFILE} (see above)"
# dfq KEY...: one value of the Dockerfile's config (strings as they are, the rest as JSON).
dfq() {
  python3 -c 'import functools, json, sys
v = functools.reduce(lambda a, k: a[k], sys.argv[2:], json.loads(sys.argv[1]))
print(v if isinstance(v, str) else json.dumps(v))' "${DF_JSON}" "$@"
}
ENTRYPOINT_JSON=$(dfq entrypoint)
BINARY_PATH=$(dfq copies | python3 -c 'import json,sys; c=json.load(sys.stdin); print(c[0]["dest"] if len(c)==1 else "")')
[[ -n "${BINARY_PATH}" ]] || die "the Dockerfile's final stage must COPY exactly one file (the binary)"
USER_SPEC=$(dfq user); [[ "${USER_SPEC}" != "None" && "${USER_SPEC}" != "null" ]] || USER_SPEC="${BASE_USER}"
WORKDIR=$(dfq workdir); [[ "${WORKDIR}" != "None" && "${WORKDIR}" != "null" ]] || WORKDIR="${BASE_WORKDIR}"
[[ -n "${TAG}" ]] || TAG=$(dfq build_args VERSION)

# Everything the check compares the built image with, in one place.
EXPECTED_JSON=$(python3 - "${DF_JSON}" "${USER_SPEC}" "${WORKDIR}" "${SUITE}" "${BINARY_PATH}" \
  "${LIBRARY_PACKAGES[*]}" "${DATA_PACKAGES[*]}" "${BASE_ENV[@]}" <<'PY'
import json, sys
df, user, workdir, suite, binary, libs, data, *env = sys.argv[1:]
df = json.loads(df)
print(json.dumps({
    "base": df["base"], "suite": suite, "binary": binary,
    "entrypoint": df["entrypoint"], "cmd": df["cmd"], "user": user, "workdir": workdir,
    "env": env + df["env"], "labels": df["labels"],
    "library_packages": libs.split(), "data_packages": data.split(),
}, indent=1, sort_keys=True))
PY
)
if [[ "${PRINT_CONFIG}" == true ]]; then
  printf '%s\n' "${EXPECTED_JSON}"
  exit 0
fi

for tool in python3 apt-get dpkg-deb tar umoci objdump readelf sha256sum; do
  command -v "${tool}" >/dev/null 2>&1 || die "${tool} not found (hack/ci-image.sh installs umoci and skopeo)"
done
if [[ -z "${ARCHIVE}" ]]; then
  if command -v skopeo >/dev/null 2>&1; then ARCHIVE=docker; else ARCHIVE=none; fi
fi
case "${ARCHIVE}" in
  docker | oci | all) command -v skopeo >/dev/null 2>&1 || die "--archive ${ARCHIVE} needs skopeo" ;;
  none) ;;
  *) die "--archive: docker, oci, all or none" ;;
esac

if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
  SOURCE_DATE_EPOCH=$(git -C "${REPO_ROOT}" log -1 --format=%ct 2>/dev/null || echo 0)
fi
CREATED=$(date -u -d "@${SOURCE_DATE_EPOCH}" +%Y-%m-%dT%H:%M:%SZ)

mkdir -p "${OUT_DIR}"
OUT_DIR=$(cd "${OUT_DIR}" && pwd)
WORK="${OUT_DIR}/work"
rm -rf "${WORK}"
mkdir -p "${WORK}"

# 1. The binary.
if [[ -z "${BINARY}" ]]; then
  # The builder stage's RUSTFLAGS (packed relocations, glibc linked statically) and --target,
  # so both builds link the same binary.
  NODE_RUSTFLAGS=$(bash "${REPO_ROOT}/hack/dockerfile-rustflags.sh" "${DOCKERFILE}")
  HOST=$(rustc --print host-tuple)
  log "RUSTFLAGS='${NODE_RUSTFLAGS}' cargo build --profile node --locked --no-default-features --bin tandem --target ${HOST}"
  (cd "${REPO_ROOT}" && RUSTFLAGS="${NODE_RUSTFLAGS}" \
    cargo build --profile node --locked --no-default-features --bin tandem --target "${HOST}")
  BINARY="${REPO_ROOT}/target/${HOST}/node/tandem"
fi
[[ -f "${BINARY}" && -x "${BINARY}" ]] || die "binary ${BINARY} missing or not executable"
log "binary ${BINARY} ($(du -h "${BINARY}" | cut -f1))"

# 2. The Debian packages, through an apt of our own: the host's sources and state are not used,
# so the packages are bookworm's whatever the host runs.
APT_DIR="${OUT_DIR}/cache/apt-${SUITE}-${DEB_ARCH}"
mkdir -p "${APT_DIR}/lists/partial" "${APT_DIR}/archives/partial" "${WORK}/debs"
: > "${APT_DIR}/status"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f "${KEYRING}" ]] || die "${KEYRING} missing (apt-get install debian-archive-keyring)"
cat > "${APT_DIR}/sources.list" <<EOF
deb [signed-by=${KEYRING}] ${DEBIAN_MIRROR} ${SUITE} main
deb [signed-by=${KEYRING}] ${DEBIAN_MIRROR} ${SUITE}-updates main
deb [signed-by=${KEYRING}] ${DEBIAN_SECURITY_MIRROR} ${SUITE}-security main
EOF
APT_OPTS=(-qq -o "Dir::Etc::SourceList=${APT_DIR}/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::Etc::Preferences=/dev/null" -o Dir::Etc::PreferencesParts=/dev/null
  -o "Dir::State::Lists=${APT_DIR}/lists" -o "Dir::State::status=${APT_DIR}/status"
  -o "Dir::Cache=${APT_DIR}" -o "Dir::Cache::Archives=${APT_DIR}/archives"
  -o "APT::Architecture=${DEB_ARCH}" -o "APT::Architectures=${DEB_ARCH}"
  -o APT::Sandbox::User=root -o Debug::NoLocking=1)
PACKAGES=("${LIBRARY_PACKAGES[@]}" "${DATA_PACKAGES[@]}")
log "debian ${SUITE}/${DEB_ARCH} from ${DEBIAN_MIRROR}: ${PACKAGES[*]}"
apt-get "${APT_OPTS[@]}" update
(cd "${WORK}/debs" && apt-get "${APT_OPTS[@]}" download "${PACKAGES[@]}")

# 3. The root filesystem: the packages' files without docs (copyright files stay), the CA
# bundle update-ca-certificates would write, distroless's users, and the dpkg status entries
# image scanners read to find the packages.
ROOTFS="${WORK}/rootfs"
mkdir -p "${ROOTFS}/var/lib/dpkg/status.d"
: > "${OUT_DIR}/packages.txt"
for deb in "${WORK}"/debs/*.deb; do
  pkg=$(dpkg-deb -f "${deb}" Package)
  dpkg-deb -x "${deb}" "${ROOTFS}"
  { dpkg-deb -f "${deb}"; echo "Status: install ok installed"; } \
    | grep -v '^\(Description\|Homepage\|Original-Maintainer\|Tag\): ' \
    | grep -v '^ ' > "${ROOTFS}/var/lib/dpkg/status.d/${pkg}"
  echo "${pkg} $(dpkg-deb -f "${deb}" Version)" >> "${OUT_DIR}/packages.txt"
done
(
  cd "${ROOTFS}"
  mkdir -p etc/ssl/certs
  find usr/share/ca-certificates -name '*.crt' | sort | xargs cat > etc/ssl/certs/ca-certificates.crt
  for doc in usr/share/doc/*/; do
    find "${doc}" -mindepth 1 -maxdepth 1 -not -name copyright -exec rm -rf {} +
  done
  find usr/share/doc -xtype l -delete
  # gconv: iconv modules (8 MiB) nothing in Rust loads. The rest is docs, package tooling and
  # maintainer-script helpers that need a shell the image does not have.
  rm -rf usr/share/man usr/share/info usr/share/lintian usr/share/locale usr/share/base-files \
    usr/share/ca-certificates usr/sbin/update-ca-certificates etc/ca-certificates \
    etc/update-motd.d etc/profile.d etc/skel "usr/lib/${MULTIARCH}/gconv" \
    usr/share/zoneinfo/right
  find . -depth -type d -empty -not -path './tmp' -not -path './root' -not -path './home' \
    -not -path './proc' -not -path './sys' -not -path './dev' -not -path './run' -delete
  mkdir -p tmp root "home/nonroot" proc sys dev run
  chmod 1777 tmp
  chmod 0700 root "home/nonroot"
  cat > etc/passwd <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat > etc/group <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
  cat > etc/nsswitch.conf <<'EOF'
passwd:         files
group:          files
shadow:         files
hosts:          files dns
networks:       files
protocols:      files
services:       files
ethers:         files
rpc:            files
EOF
)

# Layers as tar files we write ourselves: sorted, one mtime, numeric owners, no atime/ctime,
# so that they are byte-for-byte the same from the same inputs.
TAR_OPTS=(--sort=name --format=posix --numeric-owner --mtime="@${SOURCE_DATE_EPOCH}"
  "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime")
mapfile -t top < <(cd "${ROOTFS}" && ls -A)
tar "${TAR_OPTS[@]}" --owner=0 --group=0 --exclude=home/nonroot \
  -C "${ROOTFS}" -cf "${WORK}/base.tar" "${top[@]}"
tar "${TAR_OPTS[@]}" --owner=65532 --group=65532 -C "${ROOTFS}" -rf "${WORK}/base.tar" home/nonroot
mkdir -p "${WORK}/app/$(dirname "${BINARY_PATH#/}")"
install -m 0755 "${BINARY}" "${WORK}/app/${BINARY_PATH#/}"
tar "${TAR_OPTS[@]}" --owner=0 --group=0 -C "${WORK}/app" -cf "${WORK}/app.tar" "${BINARY_PATH#/}"

# 4. The OCI image.
OCI="${OUT_DIR}/oci"
log "umoci: ${OCI}:${TAG}"
rm -rf "${OCI}"
umoci init --layout "${OCI}"
umoci new --image "${OCI}:${TAG}"
umoci raw add-layer --image "${OCI}:${TAG}" --history.created "${CREATED}" \
  --history.created_by "hack/build-image.sh: debian ${SUITE} ${PACKAGES[*]}" "${WORK}/base.tar"
umoci raw add-layer --image "${OCI}:${TAG}" --history.created "${CREATED}" \
  --history.created_by "COPY --from=builder /tandem ${BINARY_PATH}" "${WORK}/app.tar"
config_args=(--created "${CREATED}" --history.created "${CREATED}"
  --history.created_by "hack/build-image.sh: config from Dockerfile"
  --os linux --architecture "${OCI_ARCH}" --config.user "${USER_SPEC}" --config.workingdir "${WORKDIR}")
while read -r item; do config_args+=(--config.entrypoint "${item}"); done \
  < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])))' "${ENTRYPOINT_JSON}")
while read -r item; do [[ -n "${item}" ]] && config_args+=(--config.cmd "${item}"); done \
  < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1]) or []))' "$(dfq cmd)")
while read -r item; do config_args+=(--config.env "${item}"); done \
  < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])["env"]))' "${EXPECTED_JSON}")
while read -r item; do config_args+=(--config.label "${item}"); done \
  < <(python3 -c 'import json,sys; print("\n".join(f"{k}={v}" for k,v in sorted(json.loads(sys.argv[1]).items())))' "$(dfq labels)")
umoci config --image "${OCI}:${TAG}" "${config_args[@]}"
umoci gc --layout "${OCI}"

case "${ARCHIVE}" in
  docker | all)
    log "skopeo: ${OUT_DIR}/tandem-${TAG}.docker.tar (${IMAGE_NAME}:${TAG})"
    rm -f "${OUT_DIR}/tandem-${TAG}.docker.tar"
    skopeo --insecure-policy copy --quiet "oci:${OCI}:${TAG}" \
      "docker-archive:${OUT_DIR}/tandem-${TAG}.docker.tar:${IMAGE_NAME}:${TAG}" ;;&
  oci | all)
    log "skopeo: ${OUT_DIR}/tandem-${TAG}.oci.tar"
    rm -f "${OUT_DIR}/tandem-${TAG}.oci.tar"
    skopeo --insecure-policy copy --quiet "oci:${OCI}:${TAG}" "oci-archive:${OUT_DIR}/tandem-${TAG}.oci.tar:${TAG}" ;;
  *) ;;
esac

# The image's manifest digest, compressed size and config, straight from the layout's blobs.
image_json() {
  python3 - "${OCI}" "${TAG}" <<'PY'
import json, os, sys
oci, tag = sys.argv[1:]
blob = lambda d: os.path.join(oci, "blobs", *d.split(":"))
idx = json.load(open(os.path.join(oci, "index.json")))
desc = next(m for m in idx["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
man = json.load(open(blob(desc["digest"])))
cfg = json.load(open(blob(man["config"]["digest"])))
print(json.dumps({"digest": desc["digest"], "size": sum(l["size"] for l in man["layers"]),
                  "layers": len(man["layers"]), "config": cfg.get("config", {})}))
PY
}
IMAGE_JSON=$(image_json)
rm -rf "${WORK}/debs" "${WORK}/app" "${ROOTFS}" "${WORK}"/*.tar

if [[ "${CHECK}" == true ]]; then
  log "checking the image without a container engine"
  # Config: exactly what the Dockerfile says (entrypoint, user, labels, env, workdir).
  python3 - "${IMAGE_JSON}" "${EXPECTED_JSON}" <<'PY' || die "image config differs from the Dockerfile"
import json, sys
got = json.loads(sys.argv[1])["config"]
want = json.loads(sys.argv[2])
checks = [("Entrypoint", want["entrypoint"]), ("Cmd", want["cmd"]), ("User", want["user"]),
          ("WorkingDir", want["workdir"]), ("Env", want["env"]), ("Labels", want["labels"])]
bad = [f"  {k}: image {got.get(k)!r}, Dockerfile {v!r}" for k, v in checks if got.get(k) != v]
if bad:
    sys.exit("\n".join(bad))
print(f"   config: Entrypoint {got['Entrypoint']} User {got['User']} {len(got['Labels'])} labels")
PY
  # The docker archive (what `docker load` and `kind load image-archive` read) carries the same.
  docker_archive="${OUT_DIR}/tandem-${TAG}.docker.tar"
  if [[ "${ARCHIVE}" == docker || "${ARCHIVE}" == all ]]; then
    python3 - "$(skopeo inspect --config "docker-archive:${docker_archive}")" "${IMAGE_JSON}" <<'PY' \
      || die "${docker_archive}: config differs from the OCI image's"
import json, sys
got, want = json.loads(sys.argv[1])["config"], json.loads(sys.argv[2])["config"]
if got != want:
    sys.exit(f"docker archive {got}\nOCI image {want}")
PY
    echo "   docker archive: same config as the OCI image"
  fi
  unpack_opts=()
  [[ "$(id -u)" == 0 ]] || unpack_opts=(--rootless)
  umoci unpack "${unpack_opts[@]}" --image "${OCI}:${TAG}" "${WORK}/bundle" >/dev/null
  root="${WORK}/bundle/rootfs"
  bin="${root}${BINARY_PATH}"
  [[ -f "${bin}" && -x "${bin}" ]] || die "${BINARY_PATH} missing or not executable in the image"
  [[ "$(sha256sum < "${bin}")" == "$(sha256sum < "${BINARY}")" ]] || die "${BINARY_PATH} differs from ${BINARY}"

  # Every library the binary links, and its loader, come from the image itself. The node
  # build (the Dockerfile's RUSTFLAGS) is a static-pie with neither; a debug build (CI) has both.
  interp=$(readelf -lW "${bin}" | sed -n 's/.*Requesting program interpreter: \(.*\)]$/\1/p')
  mapfile -t needed < <(objdump -p "${bin}" | awk '$1 == "NEEDED" {print $2}')
  loader=""
  if [[ -n "${interp}" ]]; then
    # Follow the loader's symlinks inside the image (/lib64/ld-linux-x86-64.so.2 is an
    # absolute link), not on the host.
    loader="${interp}"
    for _ in 1 2 3 4 5 6 7 8; do
      [[ -L "${root}${loader}" ]] || break
      target=$(readlink "${root}${loader}")
      if [[ "${target}" == /* ]]; then loader="${target}"; else loader="$(dirname "${loader}")/${target}"; fi
    done
    [[ -f "${root}${loader}" && ! -L "${root}${loader}" ]] || die "the loader ${interp} is not in the image"
  elif [[ ${#needed[@]} -gt 0 ]]; then
    die "the binary needs ${needed[*]} but names no loader"
  fi
  for lib in "${needed[@]}"; do
    found=false
    for dir in "lib/${MULTIARCH}" "usr/lib/${MULTIARCH}" lib usr/lib; do
      [[ -e "${root}/${dir}/${lib}" ]] && found=true && break
    done
    [[ "${found}" == true ]] || die "the binary needs ${lib}, which no package in LIBRARY_PACKAGES provides"
  done
  if [[ -n "${interp}" ]]; then
    echo "   libraries: ${interp} ${needed[*]} (all from the image)"
  else
    echo "   libraries: none (statically linked)"
  fi

  user_spec="${USER_SPEC}"; [[ "${user_spec}" == *:* ]] || user_spec="${user_spec}:${user_spec}"
  # The hook binary the DaemonSet's init container installs: it runs this image's entrypoint
  # with `hook install --to PATH`, which copies the running binary to PATH.
  hook_to=$(awk '/^ *- --to=/{sub(/.*--to=/, ""); print; exit} /^ *- --to$/{getline; sub(/^ *- */, ""); print; exit}' \
    "${REPO_ROOT}"/deploy/overlays/*/*.yaml)
  [[ -n "${hook_to}" ]] || die "no init container with 'hook install --to' under deploy/overlays"
  # Inside the image's root as the image runs it: its user, its loader and libraries, a /proc
  # of its own (the hook finds its binary through /proc/self/exe), nothing from the host env.
  # Needs root; otherwise (or where namespaces are refused) the binary runs through the image's
  # loader from the outside, and the hook copies from the unpacked root to a scratch dir.
  chroot=$(command -v chroot || true) unshare=$(command -v unshare || true)
  in_image=false
  if [[ "$(id -u)" == 0 && -n "${chroot}" && -n "${unshare}" ]] \
    && "${unshare}" --mount --pid --fork --mount-proc="${root}/proc" true 2>/dev/null; then
    in_image=true
  fi
  run_in_image() {
    local userspec="$1"; shift
    env -i "${unshare}" --mount --pid --fork --mount-proc="${root}/proc" \
      "${chroot}" --userspec="${userspec}" "${root}" "$@"
  }
  if [[ "${in_image}" == true ]]; then
    version=$(run_in_image "${user_spec}" "${BINARY_PATH}" version)
    # uid 0, as the init container runs it; the copy lands inside the unpacked root.
    hook_dest="${root}${hook_to}"
    run_in_image 0:0 "${BINARY_PATH}" hook install --to "${hook_to}" > "${WORK}/hook.log" 2>&1 \
      || { cat "${WORK}/hook.log" >&2; die "hook install failed in the image"; }
  else
    if [[ -z "${loader}" ]]; then
      version=$(env -i "${bin}" version)
    else
      version=$(env -i "${root}${loader}" --inhibit-cache --library-path \
        "${root}/lib/${MULTIARCH}:${root}/usr/lib/${MULTIARCH}" "${bin}" version)
    fi
    hook_dest="${WORK}/hook-root${hook_to}"
    "${bin}" hook install --to "${hook_dest}" > "${WORK}/hook.log" 2>&1 \
      || { cat "${WORK}/hook.log" >&2; die "hook install failed"; }
  fi
  cmp -s "${hook_dest}" "${bin}" || die "hook install --to ${hook_to} did not copy ${BINARY_PATH}"
  [[ -x "${hook_dest}" ]] || die "${hook_to} is not executable after hook install"
  echo "   hook: the init container's \`hook install --to ${hook_to}\` copies the image's ${BINARY_PATH}" \
    "($([[ "${in_image}" == true ]] && echo "run in the image" || echo "run from the unpacked root"))"
  [[ "${version}" == "tandem "* ]] || die "\`tandem version\` printed '${version}'"
  echo "   ${BINARY_PATH} version: ${version}"
  label_version=$(dfq labels org.opencontainers.image.version 2>/dev/null || true)
  if [[ -n "${label_version}" && "${version}" != "tandem ${label_version}" ]]; then
    echo "   warning: label org.opencontainers.image.version=${label_version}, binary says '${version}'" >&2
  fi
  rm -rf "${WORK}/bundle" "${WORK}/hook.log" "${WORK}/hook-root"
fi
rmdir "${WORK}" 2>/dev/null || true

python3 - "${IMAGE_JSON}" "${OCI}" "${TAG}" <<'PY'
import json, sys
img = json.loads(sys.argv[1])
print(f"== image {sys.argv[2]}:{sys.argv[3]} {img['digest']}, {img['layers']} layers, "
      f"{img['size'] / 2**20:.1f} MiB compressed")
PY
for archive in "${OUT_DIR}/tandem-${TAG}.docker.tar" "${OUT_DIR}/tandem-${TAG}.oci.tar"; do
  [[ -f "${archive}" ]] && echo "   archive: ${archive} ($(du -h "${archive}" | cut -f1))"
done
exit 0
