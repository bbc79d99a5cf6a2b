# Multi-stage build of the product binary (tarspay-worker) and the simulated gateway
# (tarspay-sandbox, used by the compose file's `sandbox` profile).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tarspay-worker -p tarspay-sandbox

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 tarspay
COPY --from=build /src/target/release/tarspay-worker /src/target/release/tarspay-sandbox /usr/local/bin/
COPY crates/tarspay-worker/config /etc/tarspay-worker
USER tarspay
ENTRYPOINT ["tarspay-worker", "--config", "/etc/tarspay-worker/default.toml"]
CMD ["--help"]
