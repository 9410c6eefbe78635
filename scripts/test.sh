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
# A short coverage-guided fuzzing run of each target (tests/fuzz), where the
# nightly toolchain is installed (scripts/fuzz.sh says so and skips it
# otherwise); the committed corpus already ran above on stable
# (kiln-tests' fuzz_corpus).
./scripts/fuzz.sh 20
