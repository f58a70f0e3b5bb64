#!/usr/bin/env bash
# The GPU checks of the Python Checkpointer, in one go (at most 9 minutes: build 270 s,
# tests 120 s, bench 150 s; BENCH_SIZE overrides the bench's --size, default 1GiB):
# builds the daemon and CLI (release), runs the CUDA tests (pytest -k cuda) against
# them, then the benchmark on the GPU (`python -m tierckpt.bench --device cuda --json`).
# Results go under $OUT when it is set (else ./gpu-check-out): cuda-tests.log,
# cuda-tests.xml, bench.json, bench.log, nvidia-smi.txt, summary.txt.
# Needs cargo, a Python with torch (CUDA build), xxhash, numpy, pytest, safetensors
# ($PYTHON, default: .venv/bin/python, else python3) and an NVIDIA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SIZE="${BENCH_SIZE:-1GiB}"
status=0
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv \
    2>&1 || echo "nvidia-smi failed"
} > "$OUT/nvidia-smi.txt"

echo "== cargo build --release (tierckptd, tierckpt)"
if ! timeout 270 cargo build --release -p tierckpt-daemon -p tierckpt > "$OUT/build.log" 2>&1; then
  echo "build failed; see $OUT/build.log"; tail -20 "$OUT/build.log"; exit 1
fi

echo "== CUDA tests"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || echo "warning: torch sees no CUDA device here; the CUDA tests will be skipped" | tee -a "$OUT/summary.txt"
CARGO_TARGET_DIR_RELEASE="${CARGO_TARGET_DIR:-$ROOT/target}"
# conftest looks in $CARGO_TARGET_DIR/debug: point it at a directory holding the release binaries
BIN="$(mktemp -d)"
mkdir -p "$BIN/debug"
cp "$CARGO_TARGET_DIR_RELEASE/release/tierckptd" "$CARGO_TARGET_DIR_RELEASE/release/tierckpt" "$BIN/debug/"
CARGO_TARGET_DIR="$BIN" PYTHONPATH="$ROOT/python" OMP_NUM_THREADS=1 timeout 120 \
  "$PYTHON" -m pytest -q -rs -k cuda tests/python --junitxml="$OUT/cuda-tests.xml" > "$OUT/cuda-tests.log" 2>&1
rc=$?
tail -15 "$OUT/cuda-tests.log"
[ $rc -eq 0 ] || status=1
echo "cuda tests: exit $rc" >> "$OUT/summary.txt"

echo "== bench (--device cuda --size $SIZE)"
PATH="$CARGO_TARGET_DIR_RELEASE/release:$PATH" TIERCKPT_DAEMON_BIN="$CARGO_TARGET_DIR_RELEASE/release/tierckptd" \
  PYTHONPATH="$ROOT/python" timeout 150 "$PYTHON" -m tierckpt.bench --device cuda --size "$SIZE" --json \
  > "$OUT/bench.json" 2> "$OUT/bench.log"
rc=$?
tail -5 "$OUT/bench.log"
[ $rc -eq 0 ] || status=1
echo "bench: exit $rc" >> "$OUT/summary.txt"
rm -rf "$BIN"
cat "$OUT/summary.txt"
exit $status
