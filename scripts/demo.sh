#!/usr/bin/env bash
# The demo: the offline policy workflow, then `skiff dev`, a local
# three-node cluster (network namespaces, real agents, real instances)
# running the demo shop. Ctrl-C stops the cluster and removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --locked --release -q
skiff=$PWD/target/release/skiff
run() { echo; echo "\$ skiff $*"; "$skiff" "$@" || true; }

echo "== Policies, checked with no cluster"
run validate -f policies examples
run policy test -f policies
run policy trace -f policies --from shop/web --to shop/payments --port 9090

echo; echo "== A local cluster: skiff dev (root: it makes network namespaces and cgroups)"
if [[ $(id -u) -ne 0 ]]; then
    echo "skiff dev needs root; run: sudo $skiff dev"
    exit 1
fi
exec "$skiff" dev
