#!/usr/bin/env bash
# Installs what building and testing Skiff needs on Debian 12, and nothing
# when it is already there. Safe to run again. Needs root for apt-get.
set -euo pipefail

# Debian packages the build and the tests use:
#   git            `skiff policy diff` reads the base revision with git (and its tests)
#   gcc, libc6-dev linking Rust binaries
#   pkg-config     crates probing system libraries
#   ca-certificates  reaching the package registries over HTTPS
#   prometheus     promtool, which checks the API server's /metrics in the tests
#   curl           talking to the API by hand in the README's examples; the demo and the
#                  end-to-end tests reach instances with it
#   iproute2       `ip`: the agent and `skiff dev` make namespaces, veths and routes with it
#   clang, libbpf-dev  building the eBPF datapath (ebpf/*.bpf.c, compiled by skiff-netpol's build.rs)
#   wrk, iptables  `skiff bench policy` (load, and the iptables peer), smoke-tested in the suite
#   haproxy, nginx `skiff bench proxy`: the peers the Skiff proxy is measured against (smoke-tested)
#   tcpdump        the mesh test checks that only TLS crosses between nodes
#   nghttp2-client h2load: HTTP/2 load through the mesh in its test
#   dnsutils       dig: cluster DNS over TCP in the mesh test
#   openssl        a certificate for the ingress gateway's HTTPS in the mesh test
PACKAGES=(git gcc libc6-dev pkg-config ca-certificates prometheus curl iproute2 clang libbpf-dev wrk iptables haproxy nginx tcpdump nghttp2-client dnsutils openssl)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-deps: installing ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Start no services from packages (prometheus would): a policy-rc.d
    # that refuses, unless the machine already has one.
    own_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
    if [[ -n "$own_policy" ]]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# The Rust toolchain cannot be downloaded here; it must come with the machine.
if ! command -v cargo >/dev/null; then
    for dir in "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
        [[ -x "$dir/cargo" ]] && export PATH="$dir:$PATH" && break
    done
fi
if ! command -v cargo >/dev/null; then
    echo "install-deps: cargo not found; install Rust 1.95 (rustup) first" >&2
    exit 1
fi
version=$(rustc --version | awk '{print $2}')
if [[ "$(printf '%s\n1.95.0\n' "$version" | sort -V | head -1)" != "1.95.0" ]]; then
    echo "install-deps: Rust $version is older than 1.95" >&2
    exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true
