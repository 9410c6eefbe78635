#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the real-KVM
# end-to-end tests. Runs setup first (a no-op when everything is in place).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
