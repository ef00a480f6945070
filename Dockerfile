# syntax=docker/dockerfile:1
# The embedfleet binary on a distroless base: no shell, no package manager, non-root (65532).
# Models are not in the image: they come from a volume (`embedfleet fetch` fills it, see the
# Helm chart's init container). Not built in this repository's CI (no registry for base
# images is reachable there); reviewed by hand.
#
#   docker build -t embedfleet:local .
#   docker run --rm -v $PWD/models:/models:ro embedfleet:local worker --models minilm --nats-url nats://host:4222

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
# The workspace's release profile (thin LTO); only the CLI crate and what it needs.
RUN cargo build --release --locked -p embedfleet-cli \
 && install -D -m 0755 target/release/embedfleet /out/embedfleet

# glibc + libgcc/libstdc++, nothing else; the `nonroot` tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/embedfleet /usr/local/bin/embedfleet
# The roles' HTTP listener defaults to 0.0.0.0:9090.
ENV EMBEDFLEET_MODELS_DIR=/models \
    HF_HOME=/models/.hf
USER 65532:65532
EXPOSE 9090
# Probes: /healthz, /readyz, /metrics on 9090 (`embedfleet probe` checks one from inside).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD ["/usr/local/bin/embedfleet", "probe"]
ENTRYPOINT ["/usr/local/bin/embedfleet"]
CMD ["--help"]
