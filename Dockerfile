# syntax=docker/dockerfile:1
# One image, one `tandem` binary for every role: the node plugin DaemonSet, the controller
# Deployment, and `tandem topo` / `tandem fixture` run by hand with kubectl exec.

FROM rust:1-bookworm AS builder
WORKDIR /build
# Packed relative relocations (DT_RELR; glibc >= 2.36, as in the distroless base): the
# relocation table of the position-independent binary shrinks from 1.8 MB to 27 KB, which
# the loader otherwise reads at every start (13.7 MB binary instead of 15.2, about 1.4 MiB
# less idle RSS; BENCHMARKS.md). hack/dockerfile-rustflags.sh reads this line for the builds
# outside Docker (hack/build-image.sh, hack/footprint.sh, hack/hot-functions.sh).
# glibc linked statically (a static-pie binary): no libc.so, libm.so, libgcc_s.so or ld.so to
# map, so 1.2-1.9 MiB less RSS, idle and after work (BENCHMARKS.md); and the copy `hook
# install` puts on the host runs whatever glibc the host has. With this flag cargo needs
# --target (else it would apply to proc-macros too), so the binary is target/<host>/node/tandem.
ENV RUSTFLAGS="-C link-arg=-Wl,-z,pack-relative-relocs -C target-feature=+crt-static"

# Dependencies and the workspace's library crates (crates/: the kubelet-plugin crate with
# its protos) first, against placeholder sources for the `tandem` package, so that a change
# to src/ alone reuses this layer. benches/ goes in because cargo refuses a manifest whose
# [[bench]] files are missing; it is not compiled here.
# .cargo/config.toml makes hack/link-hot-first.sh the linker: it links the binary with its
# start-up and prepare code first (hack/hot-functions.txt): 4 MiB less idle RSS.
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo ./.cargo
COPY hack/link-hot-first.sh hack/hot-functions.txt ./hack/
COPY crates ./crates
COPY benches ./benches
RUN host=$(rustc --print host-tuple) \
    && mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --profile node --locked --no-default-features --bin tandem --target "$host" \
    && rm -rf src \
        target/"$host"/node/tandem target/"$host"/node/.fingerprint/tandem-[0-9a-f]* \
        target/"$host"/node/deps/tandem-[0-9a-f]* target/"$host"/node/deps/libtandem-[0-9a-f]*

# The placeholder fingerprints are gone above, so cargo rebuilds this crate from the real
# sources whatever their timestamps.
COPY src ./src
# Without the default `demo` feature: no fixtures, no apiserver fake, no `demo` subcommand.
# The `node` profile (Cargo.toml): release with whole-program LTO and one codegen unit.
RUN host=$(rustc --print host-tuple) \
    && cargo build --profile node --locked --no-default-features --bin tandem --target "$host" \
    && install -m 0755 target/"$host"/node/tandem /tandem

# The binary needs no library of the image (glibc is linked in; rustls, not OpenSSL); the base
# gives CA certificates, zoneinfo and /etc/passwd with `nonroot`.
# hack/build-image.sh builds the same image without a container engine (CI runs it) from
# Debian bookworm packages. It reads this stage, ENTRYPOINT, USER and LABELs included, and
# stops at an instruction it does not replicate: see docs/image.md before adding one.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="tandem" \
      org.opencontainers.image.description="Kubernetes DRA driver that hands out accelerators together with their closest RDMA NIC" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /tandem /tandem
# Non-root by default (uid 65532). The node plugin DaemonSet runs it as uid 0 because it
# writes root-owned host directories; the controller keeps this user.
USER 65532:65532
ENTRYPOINT ["/tandem"]
