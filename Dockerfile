# Multi-stage build: compile in the Rust image, run in a slim Debian image as a non-root user.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config
RUN cargo build --release --locked --bin palisade

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin palisade
COPY --from=build /src/target/release/palisade /usr/local/bin/palisade
COPY config/palisade.toml /etc/palisade/palisade.toml
USER palisade
EXPOSE 8080
# The admin listener defaults to 127.0.0.1:9901 (inside the container only); to scrape it from
# outside, set admin.listen = "0.0.0.0:9901" and admin.token in your config.
ENTRYPOINT ["/usr/local/bin/palisade"]
CMD ["run", "-c", "/etc/palisade/palisade.toml"]
