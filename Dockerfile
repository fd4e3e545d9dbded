# The `dormouse` binary (server and CLI) in a small image.
#
#   docker build -t dormouse .
#   docker run -d --name dormouse -p 8080:8080 -v dormouse-data:/var/lib/dormouse \
#     -e DORMOUSE_AUTH_JWT_SECRET="$(openssl rand -base64 48)" dormouse
#
# The server listens on 0.0.0.0:8080 in the container and refuses to start there without
# authentication: configure [auth] (the secret above, a public key file or API keys), or pass
# `serve --allow-anonymous` when something in front of it authenticates. See docs/DEPLOY.md.

# Build stage: the full toolchain (ring and jemalloc compile C, which this image has).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dormouse --bin dormouse \
    && install -m 0755 target/release/dormouse /usr/local/bin/dormouse

# Runtime stage: glibc from the same Debian release as the builder, nothing else. No
# ca-certificates needed: the server makes no outbound TLS, and the CLI carries its own roots.
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 dormouse \
    && useradd --system --uid 10001 --gid dormouse --home-dir /var/lib/dormouse \
       --shell /usr/sbin/nologin dormouse \
    && mkdir -p /var/lib/dormouse \
    && chown dormouse:dormouse /var/lib/dormouse
COPY --from=build /usr/local/bin/dormouse /usr/local/bin/dormouse
USER dormouse:dormouse
WORKDIR /var/lib/dormouse
ENV DORMOUSE_LISTEN=0.0.0.0:8080 \
    DORMOUSE_DATA_DIR=/var/lib/dormouse \
    RUST_LOG=info
# Everything durable lives here; a container without a volume loses it on removal.
VOLUME ["/var/lib/dormouse"]
EXPOSE 8080
# SIGTERM is a graceful stop: SSE clients are told to reconnect, WebSockets get 1012, storage
# is flushed (within shutdown_grace, 5 s by default; keep `docker stop -t` above 15 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dormouse"]
CMD ["serve"]
