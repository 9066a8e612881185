# connscope agent image. Build: docker build -t connscope .
# Stage 1 builds the eBPF object (nightly + bpf-linker against the nightly's
# LLVM, via `cargo xtask setup`) and the agent; stage 2 is the runtime.
FROM rust:1.95-bookworm AS build
RUN rustup toolchain install nightly --profile minimal \
 && apt-get update && apt-get install -y --no-install-recommends iproute2 iptables \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# --no-default-features: the image carries no test bed (connect-storm
# generator, stand-in sidecar and apps, netns helpers) and no demo.
RUN cargo xtask setup && cargo build --release --package connscope --no-default-features \
 && cp target/release/connscope /connscope

FROM debian:bookworm-slim
COPY --from=build /connscope /usr/local/bin/connscope
# Root inside the container is needed for BPF; capabilities are limited by the
# DaemonSet (BPF, PERFMON, SYS_PTRACE, SYS_RESOURCE; everything else dropped).
USER 0
ENTRYPOINT ["/usr/local/bin/connscope"]
CMD ["run"]
