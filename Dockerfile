# syntax=docker/dockerfile:1
# Build stage: compiles the server (rdkafka's bundled librdkafka needs cmake and these headers; the
# V8 shim needs libnode-dev's headers and libnode.so, found in / by build.rs).
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev libsasl2-dev zlib1g-dev libzstd-dev libcurl4-openssl-dev libnode-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --bin plugin-server && cp target/release/plugin-server /plugin-server

# Runtime stage: slim Debian with only the shared libraries the binary links.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 zlib1g libzstd1 libcurl4 libnode108 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /code --create-home posthog
COPY --from=build /plugin-server /usr/local/bin/plugin-server
WORKDIR /code
USER posthog
ENV BASE_DIR=/code
HEALTHCHECK --start-period=10s --interval=10s --timeout=10s CMD ["plugin-server", "--healthcheck"]
ENTRYPOINT ["plugin-server"]
