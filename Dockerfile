# Tern edge node image: `docker build -t tern .` (or `podman build`). Multi-stage: the
# release binary is built in the Rust image, then copied into a slim Debian runtime that
# runs it as an unprivileged user. See docs/deploy.md.
#
#   docker run -p 7400:7400 -p 7401:7401/udp -v tern-data:/var/lib/tern \
#     -v ./edge.toml:/etc/tern/edge.toml:ro tern
# The base images can be named (a mirror, or images built locally: deploy/container-check.sh).
ARG RUST_IMAGE=docker.io/library/rust:1.85-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# No system protoc is needed (protox compiles the schema); a C compiler comes with the image.
RUN cargo build --release --locked --bin tern \
 && install -m 0755 target/release/tern /usr/local/bin/tern

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tern --shell /usr/sbin/nologin tern \
 && mkdir -p /var/lib/tern /etc/tern \
 && chown tern:tern /var/lib/tern
COPY --from=build /usr/local/bin/tern /usr/local/bin/tern
USER 10001:10001
WORKDIR /var/lib/tern
# Clients (WebSocket, HTTP, /metrics) and the QUIC backbone.
EXPOSE 7400/tcp 7401/udp
VOLUME ["/var/lib/tern"]
ENV TERN_LOG_FORMAT=json
# /healthz: the process serves; readiness (/readyz) is for load balancers and probes. A node
# on another port or behind [tls] sets TERN_HEALTH_URL (e.g. https://127.0.0.1:443/healthz;
# curl -k: the certificate names the public host, not 127.0.0.1).
ENV TERN_HEALTH_URL=http://127.0.0.1:7400/healthz
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -kfsS "$TERN_HEALTH_URL" || exit 1
# SIGTERM drains: clients are closed with 1001 and the backbone flushes (up to
# timeouts.shutdown_grace, 10 s); give the container longer than that to stop.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tern"]
CMD ["edge", "--config", "/etc/tern/edge.toml", "--data-dir", "/var/lib/tern"]
