#!/usr/bin/env bash
# The demo, until `skiff dev` (a local multi-node cluster) arrives with the
# node agent: the offline policy workflow, then a real API server with the
# demo's manifests applied, listed, watched and diffed, then stopped.
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

echo; echo "== A control plane"
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$work"' EXIT
export SKIFF_CONFIG="$work/config"
"$skiff" server --data-dir "$work/data" --listen 127.0.0.1:0 --write-config "$SKIFF_CONFIG" > "$work/server.out" 2> "$work/server.log" &
server=$!
for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.1; done
cat "$work/server.out"
"$skiff" agent --server "$(cut -d' ' -f5 "$work/server.out")" --ca-file "$work/data/pki/ca.crt" \
  --join-token "$(cat "$work/data/join-token")" --simulate 3 --node-prefix hollow- 2> "$work/agent.log" &
agent=$!
trap 'kill "$agent" "$server" 2>/dev/null; wait "$agent" "$server" 2>/dev/null; rm -rf "$work"' EXIT
run apply -f policies examples
run apply -f policies
sleep 2
echo "(three hollow nodes, as Kubemark and KWOK do: they run nothing, they report running)"
run get nodes
run get instances -n shop -o wide
echo "(why the pending ones wait: the reference Service wants disk=ssd nodes)"
"$skiff" get instances -n shop -o yaml | grep -E "^  name:|message:" || true
run get policies -n shop
run get services -A -o wide
run get policy payments -n shop -o yaml
sed 's/port: 9090/port: 9091/' policies/shop/payments.yaml > "$work/payments.yaml"
run diff -f "$work/payments.yaml"

echo; echo "== Benchmarks"
run bench policy-eval --workloads 10000 --policies 2000 --json
run bench store --clients 64 --writes 20000 --watchers 100 --json
