# Multi-stage build of the tarspay-worker binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 tarspay
COPY --from=build /src/target/release/tarspay-worker /usr/local/bin/tarspay-worker
COPY config /etc/tarspay-worker
USER tarspay
ENTRYPOINT ["tarspay-worker", "--config", "/etc/tarspay-worker/default.toml"]
CMD ["--help"]
