#!/usr/bin/env bash
# Installs skiff on this server as a control plane (`server`) or a node
# (`agent SERVER_URL JOIN_TOKEN CA_FILE`). Run as root from a checkout, after
# `cargo build --release`. Safe to run again.
#
#   deploy/install.sh server 10.0.0.10
#   deploy/install.sh agent https://10.0.0.10:7443 "$(cat token)" ca.crt [agent args...]
set -euo pipefail
cd "$(dirname "$0")/.."
role=${1:-}
[[ $(id -u) -eq 0 ]] || { echo "install.sh: run as root" >&2; exit 1; }
bin=target/release/skiff
[[ -x $bin ]] || { echo "install.sh: build first: cargo build --release" >&2; exit 1; }
install -m 0755 "$bin" /usr/local/bin/skiff
case "$role" in
  server)
    advertise=${2:?usage: install.sh server ADVERTISE_ADDRESS}
    printf 'SKIFF_ADVERTISE=%s\nSKIFF_SERVER_ARGS=\n' "$advertise" > /etc/default/skiff-server
    install -m 0644 deploy/skiff-server.service /etc/systemd/system/skiff-server.service
    systemctl daemon-reload
    systemctl enable --now skiff-server
    echo "server: up. Join token: /var/lib/skiff/join-token; CA: /var/lib/skiff/pki/ca.crt; admin config: /var/lib/skiff/admin.config"
    ;;
  agent)
    server=${2:?usage: install.sh agent SERVER_URL JOIN_TOKEN CA_FILE [agent args]}
    token=${3:?join token}
    ca=${4:?CA certificate file}
    shift 4
    apt-get install -y -qq iproute2 >/dev/null
    install -d -m 0755 /etc/skiff
    install -m 0644 "$ca" /etc/skiff/ca.crt
    umask 077
    printf 'SKIFF_SERVER=%s\nSKIFF_JOIN_TOKEN=%s\nSKIFF_AGENT_ARGS=%s\n' "$server" "$token" "$*" > /etc/default/skiff-agent
    install -m 0644 deploy/skiff-agent.service /etc/systemd/system/skiff-agent.service
    systemctl daemon-reload
    systemctl enable --now skiff-agent
    echo "agent: up; check with: skiff get nodes"
    ;;
  *)
    echo "usage: install.sh server ADVERTISE_ADDRESS | agent SERVER_URL JOIN_TOKEN CA_FILE [agent args]" >&2
    exit 2
    ;;
esac
