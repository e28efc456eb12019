# syntax=docker/dockerfile:1
#
# echo-service container image.
#
#   docker build -t echo-service:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/echo-service:0.1.0 --push .
#   docker run --rm --read-only --cap-drop=ALL --security-opt no-new-privileges \
#     -p 8000:8000 -p 9000:9000 echo-service:0.1.0
#
# Stage 1 compiles the binary with the `dist` profile (LTO, line tables) and
# splits it with objcopy: the image gets it fully stripped (panics still print
# their message with file:line), the symbols and line tables go to
# echo-service.debug, which the `debug-symbols` stage holds (`docker build
# --target debug-symbols --output type=local,dest=. .`); mounted next to the
# binary it makes RUST_BACKTRACE=1 backtraces name functions and lines. It runs on the build
# machine's architecture and cross-compiles for the target one (no emulation):
# for linux/arm64 on amd64 it installs Debian's aarch64 cross gcc and the
# rustup target. Stage 2 is distroless "cc" (glibc, libgcc, CA certificates,
# tzdata; no shell, no package manager) running as the distroless nonroot
# user, uid/gid 65532, as the Helm chart's securityContext expects. The
# entrypoint is the binary itself (exec form, no shell); Kubernetes probes the
# admin port over HTTP and the chart's preStop uses the kubelet's `sleep`.
#
# Base images are build args, pinned by digest. The digests are ones published
# for these tags (taken from public Dockerfiles); no registry is reachable from
# this repository's CI, which builds with local stand-ins of the same contents
# (`make image`, see tests/delivery/image/stand-in-bases.sh). Refresh them with
# `docker buildx imagetools inspect rust:1.95-bookworm` (and the distroless tag).

ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:bd2899c12b335c827750ccf2359879eab09c09b206023dcebea408947d54127c

# hadolint ignore=DL3006
FROM --platform=$BUILDPLATFORM ${BUILDER_IMAGE} AS build
ARG TARGETARCH
ARG BUILDARCH
WORKDIR /src
# Cross-compiling only: the target's gcc (as linker) and libc, and the Rust std.
# Versions come from the pinned builder's Debian release. Plain POSIX sh: buildah
# ignores SHELL in OCI images, so no bash-isms here.
# hadolint ignore=DL3008,SC2086
RUN if [ -n "${TARGETARCH}" ] && [ "${TARGETARCH}" != "${BUILDARCH}" ]; then \
      case "${TARGETARCH}" in \
        arm64) pkgs="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"; triple=aarch64-unknown-linux-gnu ;; \
        amd64) pkgs="gcc-x86-64-linux-gnu libc6-dev-amd64-cross"; triple=x86_64-unknown-linux-gnu ;; \
        *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
      esac; \
      apt-get update && apt-get install -y --no-install-recommends ${pkgs} && rm -rf /var/lib/apt/lists/*; \
      rustup target add "${triple}"; \
    fi
# The target's gcc links: Debian names it <triplet>-gcc both natively and for the
# cross packages above, so these are right for native and cross builds alike.
ENV CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
COPY . .
# Cache mounts keep the crate registry and the target dir between builds; the
# binary is copied out of the cached target dir so the next stage can see it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    case "${TARGETARCH:-amd64}" in \
      arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu ;; \
      *) triple=x86_64-unknown-linux-gnu; gnu=x86_64-linux-gnu ;; \
    esac \
 && cargo build --locked --profile dist --target "${triple}" --bin echo-service \
 && install -D -m 0755 "target/${triple}/dist/echo-service" /out/echo-service \
 && "${gnu}-objcopy" --only-keep-debug /out/echo-service /out/echo-service.debug \
 && "${gnu}-objcopy" --strip-all --add-gnu-debuglink=/out/echo-service.debug /out/echo-service

# The split-off symbols and line tables, for named backtraces (see above); never
# part of the runtime image.
FROM scratch AS debug-symbols
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="echo-service debug symbols" \
      org.opencontainers.image.source="https://github.com/echo-service/echo-service" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/echo-service.debug /echo-service.debug

# hadolint ignore=DL3006
FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="echo-service" \
      org.opencontainers.image.description="Observable TCP echo microservice (echo :8000, admin /metrics /healthz /readyz :9000)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/echo-service/echo-service" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/echo-service /usr/local/bin/echo-service
USER 65532:65532
# 8000: echo (tcp-echo), 9000: admin HTTP (/metrics, /healthz, /readyz).
EXPOSE 8000 9000
# SIGTERM starts the graceful drain (readiness 503, then close, then exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/echo-service"]
