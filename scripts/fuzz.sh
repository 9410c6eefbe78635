#!/usr/bin/env bash
# Coverage-guided fuzzing of kiln's hostile-input parsers (tests/fuzz):
# libFuzzer through libfuzzer-sys, built with the nightly toolchain's
# SanitizerCoverage. The targets are plain functions in each crate's
# `fuzz` module; the committed corpus (tests/fuzz/corpus/TARGET) is also
# replayed on stable by `cargo test -p kiln-tests --test fuzz_corpus`.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]   (default 10 s, all)
#
# New inputs go to tests/fuzz/corpus-new/TARGET (not committed); a crash
# leaves its input in tests/fuzz/artifacts/TARGET and fails the script.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo/tests/fuzz"
seconds=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frames cpio_names layers grant_json virtio_rng virtio_blk virtio_net vsock)

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: no nightly toolchain (rustup toolchain install nightly); skipped" >&2
  exit 0
fi
host=$(rustc -vV | sed -n 's/^host: //p')
# What cargo-fuzz passes: edge counters, their PC table and comparison
# tracing for libFuzzer; assertions and overflow checks kept in release.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps build scripts and proc macros uninstrumented.
cargo +nightly build --quiet --release --target "$host" $(printf -- '--bin %s ' "${targets[@]}")

status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus-new/$t" "artifacts/$t"
  echo "fuzz: $t for ${seconds}s"
  if ! "target/$host/release/$t" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=1024 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
      "corpus-new/$t" "corpus/$t" 2>"artifacts/$t/log"; then
    echo "fuzz: $t failed; input and log in tests/fuzz/artifacts/$t" >&2
    status=1
  fi
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)|^Done ' "artifacts/$t/log" | sed "s/^/fuzz: $t: /" || true
done
exit $status
