# syntax=docker/dockerfile:1
#
# echo-service container image.
#
#   docker build -t echo-service:0.1.0 .
#   docker run --rm -p 8000:8000 -p 9000:9000 echo-service:0.1.0
#
# Stage 1 compiles a release binary; stage 2 is distroless "cc" (glibc and
# libgcc, which a Rust binary links against; no shell, no package manager)
# running as the distroless nonroot user, uid/gid 65532, matching the Helm
# chart's securityContext. Kubernetes probes the admin port over HTTP, so the
# image needs no HEALTHCHECK tool, and the chart's preStop hook uses the
# kubelet's `sleep` action instead of a shell.
#
# Not built in CI here (no Docker engine on these machines); kept deliberately
# conventional.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is
# copied out of the cached target dir so the next stage can see it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin echo-service \
 && install -D -m 0755 target/release/echo-service /out/echo-service

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="echo-service" \
      org.opencontainers.image.description="Observable TCP echo microservice (echo :8000, admin /metrics /healthz /readyz :9000)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/echo-service /usr/local/bin/echo-service
USER 65532:65532
# 8000: echo (tcp-echo), 9000: admin HTTP (/metrics, /healthz, /readyz).
EXPOSE 8000 9000
ENTRYPOINT ["/usr/local/bin/echo-service"]
