#!/usr/bin/env bash
# The whole test suite: what CI runs. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh

echo "== format"
cargo fmt --all --check
echo "== lint"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== build"
cargo build --locked --workspace --all-targets
echo "== manifests and policies in the repository"
./target/debug/skiff validate -f policies examples
./target/debug/skiff policy test -f policies
echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --workspace --all-targets 2>&1 | tee "$log"
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "all tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
