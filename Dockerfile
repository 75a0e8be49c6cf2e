# syntax=docker/dockerfile:1
# One image for every Parley service: `parley serve <service>` picks what runs.
#
#   docker build -t parley:dev .
#   docker run --rm parley:dev check-config
#
# The build stage compiles the single `parley` binary (protos are compiled by protox, so no protoc);
# the runtime stage is distroless (glibc, no shell, no package manager) and runs as the non-root
# user 65532. Nothing is written to the root filesystem at run time, so it can be mounted read-only.

# The web client (web/), built by Vite from its lockfile; the gateway serves it at / and /status.
FROM node:20-bookworm-slim AS web
WORKDIR /web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web/ ./
RUN npx --no-install vite build

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin parley \
    && install -D -m 0755 target/release/parley /out/parley

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/parley /usr/local/bin/parley
COPY config/parley.example.toml /etc/parley/parley.example.toml
COPY --from=web /web/dist /usr/share/parley/web
ENV PARLEY_WEB_DIR=/usr/share/parley/web
USER 65532:65532
# 8080: the gateway's REST API (and its health and metrics); 50051: gRPC; 9090: health and metrics.
EXPOSE 8080 50051 9090
ENTRYPOINT ["/usr/local/bin/parley"]
CMD ["serve", "api-gateway"]
