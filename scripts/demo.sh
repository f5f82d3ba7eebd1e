#!/usr/bin/env bash
# Shows Skiff's offline policy workflow on the demo shop: validate, test,
# trace a denied and an allowed flow. (`skiff dev`, a local cluster, comes
# with the node agent.)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --locked --release -q
skiff=./target/release/skiff
run() { echo; echo "\$ skiff $*"; "$skiff" "$@" || true; }
run validate -f policies examples
run policy test -f policies
run policy trace -f policies --from shop/web --to shop/payments --port 9090
run policy trace -f policies --from shop/checkout --to shop/payments --port 9090
run bench policy-eval --workloads 10000 --policies 2000 --json
