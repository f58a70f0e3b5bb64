#!/usr/bin/env bash
# Builds the coverage-guided fuzz targets in fuzz/ (libFuzzer through the
# libfuzzer-sys crate, instrumented with stable rustc's sanitizer-coverage
# flags; no sanitizer, no nightly) and runs each for a bounded time from its
# committed seed corpus. A crash, a panic, an input slower than
# FUZZ_TIMEOUT_S seconds or a memory blow-up fails the run; libFuzzer leaves
# the input in fuzz/artifacts/<target>/ (add it to fuzz/corpus/<target>/
# with its fix).
#
#   scripts/fuzz.sh                 # every target, FUZZ_SECONDS (20) each
#   FUZZ_SECONDS=600 scripts/fuzz.sh blob frame
#
# New inputs the runs find go to fuzz/target/corpus/<target>/ (not
# committed), so a later local run resumes from them.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${FUZZ_SECONDS:-20}"
TIMEOUT_S="${FUZZ_TIMEOUT_S:-5}"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(frame shard manifest blob http_parts)
fi

HOST="$(rustc -vV | sed -n 's/^host: //p')"
# What cargo fuzz passes (less -Zsanitizer): coverage counters, the PC
# table and compare tracing for libFuzzer, and cfg(fuzzing). With an
# explicit --target these reach only the target's crates, not build scripts.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
export CARGO_INCREMENTAL=0
# Its own build directory, whatever CARGO_TARGET_DIR says: instrumented
# builds must not mix with the workspace's.
export CARGO_TARGET_DIR="$PWD/fuzz/target"
echo "== fuzz: build (${TARGETS[*]})"
cargo build --manifest-path fuzz/Cargo.toml --release --locked --target "$HOST" \
  $(printf -- '--bin %s ' "${TARGETS[@]}")

for t in "${TARGETS[@]}"; do
  work="fuzz/target/corpus/$t"
  mkdir -p "$work" "fuzz/artifacts/$t"
  echo "== fuzz: $t for ${SECONDS_EACH}s"
  log="fuzz/target/$t.log"
  # The first folder gets what the run finds; the second is read only.
  status=0
  "fuzz/target/$HOST/release/$t" "$work" "fuzz/corpus/$t" \
    -max_total_time="$SECONDS_EACH" -timeout="$TIMEOUT_S" -rss_limit_mb=2048 \
    -artifact_prefix="fuzz/artifacts/$t/" -dict=fuzz/dict/json.dict -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz target $t failed (exit $status); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
echo "== fuzz: ${#TARGETS[@]} targets ran ${SECONDS_EACH}s each without a crash or hang"
