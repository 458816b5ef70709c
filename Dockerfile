# syntax=docker/dockerfile:1
#
# The proxy-agent image: the agent binary (with its embedded eBPF object) on Debian 12 slim.
#
#   docker build -t proxy-agent:latest .
#
# Not built on the development machine (it has no Docker engine); kept correct by reading, and
# tests/tests/deploy.rs checks its shape and that its pins match the repository's.
#
# The builder mirrors `cargo xtask setup` (xtask/src/main.rs): the userspace toolchain of
# rust-toolchain.toml, the eBPF nightly named by EBPF_TOOLCHAIN in proxy-common/src/lib.rs with
# rust-src, and bpf-linker BPF_LINKER_VERSION built against that nightly's own libLLVM. The names
# are read from those files, not repeated here. xtask's host-only steps (test-bed Debian packages,
# mounting bpffs, checking cgroup v2) are left out: a build needs none of them.

FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Toolchains and bpf-linker, in a layer of their own: rebuilt only when these files change.
# In order: read the three pins; install the toolchain of rust-toolchain.toml (channel and
# components; `rustup toolchain install` without a name installs the active one) and the eBPF
# nightly with rust-src; find the nightly's libLLVM (e.g. libLLVM-22-rust-1.97.0-nightly.so: link
# name LLVM-22-rust-1.97.0-nightly, LLVM 22) and build bpf-linker against it, as xtask does.
COPY rust-toolchain.toml ./
COPY proxy-common/src/lib.rs proxy-common/src/lib.rs
COPY xtask/src/main.rs xtask/src/main.rs
RUN set -eux; \
    user_tc="$(sed -n 's/^channel *= *"\([^"]*\)".*/\1/p' rust-toolchain.toml)"; \
    ebpf_tc="$(sed -n 's/.*const EBPF_TOOLCHAIN: &str = "\([^"]*\)".*/\1/p' proxy-common/src/lib.rs)"; \
    linker_version="$(sed -n 's/^const BPF_LINKER_VERSION: &str = "\([^"]*\)".*/\1/p' xtask/src/main.rs)"; \
    test -n "$user_tc" && test -n "$ebpf_tc" && test -n "$linker_version"; \
    rustup toolchain install; \
    rustup toolchain install "$ebpf_tc" --profile minimal --component rust-src; \
    lib="$(rustc +"$ebpf_tc" --print sysroot)/lib"; \
    llvm="$(cd "$lib" && ls libLLVM-*-rust-*.so | head -n 1 | sed 's/^lib//; s/\.so$//')"; \
    test -n "$llvm"; \
    major="$(echo "$llvm" | cut -d- -f2)"; \
    RUSTFLAGS="-L $lib -l dylib=$llvm -C link-arg=-Wl,-rpath,$lib" \
        cargo +"$user_tc" install bpf-linker --version "$linker_version" --locked --force \
        --no-default-features --features "llvm-$major,no-llvm-linking"; \
    bpf-linker --version

# proxy-agent's build.rs builds proxy-ebpf with the nightly and bpf-linker and embeds the object.
COPY . .
RUN cargo build --release --locked -p proxy-agent \
    && install -m 0755 target/release/proxy-agent /usr/local/bin/proxy-agent

FROM debian:bookworm-slim
# ca-certificates: system roots for an API server reached through a kubeconfig. The init container
# of deploy/base/daemonset.yaml uses sh, stat, grep and mount, which the slim image already has.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /usr/local/bin/proxy-agent /usr/local/bin/proxy-agent
ENTRYPOINT ["/usr/local/bin/proxy-agent"]
