# The tierckpt image: `tierckptd` (the entrypoint) and the `tierckpt` CLI.
#
#   docker build -t tierckpt .
#   docker run --rm --shm-size 8g -v /etc/tierckpt:/etc/tierckpt:ro tierckpt --config /etc/tierckpt/tierckptd.toml
#
# It runs as the non-root user tierckpt (uid/gid 10001) by default. Mounting a
# huge-page tmpfs on the memory directory (mount_huge_tmpfs = true) needs root
# and CAP_SYS_ADMIN: `docker run --user 0 --cap-add SYS_ADMIN ...` (in
# Kubernetes: runAsUser: 0 and capabilities.add: [SYS_ADMIN]). See docs/DEPLOY.md.

# --- build -------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Dependencies first: the manifests, the lock file and empty targets, so that
# this layer (the slow part: every crate from crates.io) is rebuilt only when
# a manifest or Cargo.lock changes, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY crates/tierckpt-cli/Cargo.toml crates/tierckpt-cli/
COPY crates/tierckpt-client/Cargo.toml crates/tierckpt-client/
COPY crates/tierckpt-daemon/Cargo.toml crates/tierckpt-daemon/
COPY crates/tierckpt-format/Cargo.toml crates/tierckpt-format/
COPY crates/tierckpt-harness/Cargo.toml crates/tierckpt-harness/
COPY crates/tierckpt-proto/Cargo.toml crates/tierckpt-proto/
COPY crates/tierckpt-tiers/Cargo.toml crates/tierckpt-tiers/
RUN for c in crates/*/; do mkdir -p "$c/src/bin" && touch "$c/src/lib.rs"; done \
 && echo 'fn main() {}' > crates/tierckpt-cli/src/main.rs \
 && echo 'fn main() {}' > crates/tierckpt-daemon/src/bin/tierckptd.rs \
 && echo 'fn main() {}' > crates/tierckpt-harness/src/bin/tierckpt-test-writer.rs \
 && cargo build --release --locked -p tierckpt -p tierckpt-daemon \
 && rm -rf crates

# Then the sources. COPY keeps the files' own times, which may be older than
# the stubs': touch them so that cargo rebuilds the workspace crates.
COPY crates crates
RUN find crates -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p tierckpt -p tierckpt-daemon \
 && install -D -m 0755 target/release/tierckptd /out/tierckptd \
 && install -D -m 0755 target/release/tierckpt /out/tierckpt

# --- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# ca-certificates: TLS to S3, GCS and Azure endpoints.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tierckpt \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tierckpt
COPY --from=builder /out/tierckptd /usr/local/bin/tierckptd
COPY --from=builder /out/tierckpt /usr/local/bin/tierckpt

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# The peer/HTTP API (also /health and /metrics).
EXPOSE 7750
ENTRYPOINT ["/usr/local/bin/tierckptd"]
