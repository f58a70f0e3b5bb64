#!/usr/bin/env bash
# Runs every test: first the format and lint gates (cargo fmt --check,
# cargo clippy -D warnings), then a Python virtual environment with what the tests
# need (pytest, safetensors, moto_server for a real S3-protocol server, torch
# (CPU is enough; the first install downloads ~2 GB), xxhash and the
# `tierckpt` package from ./python), then
# the Rust workspace (unit, property, and integration tests with real daemon
# processes on 127.0.0.1 and tmpfs), the fuzz targets for a bounded time
# (scripts/fuzz.sh), then the Python tests.
# Needs cargo and python3 >= 3.10; the multi-host tests need root, iproute2 and
# dnsmasq (installed below with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== python environment"
VENV="${TIERCKPT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
export TIERCKPT_MOTO_SERVER="$(cd "$VENV" && pwd)/bin/moto_server"

echo "== dnsmasq"
# The multi-host tests (harness hosts.rs) run a real DNS server.
if ! command -v dnsmasq >/dev/null; then
  apt-get install -y dnsmasq-base
fi

echo "== cargo build"
cargo build --workspace --all-targets --locked

echo "== cargo test"
cargo test --workspace --locked

echo "== fuzz"
# Every fuzz target for 20 s from its committed corpus (docs/FUZZING.md).
./scripts/fuzz.sh

echo "== python tests"
# Real daemons, real torch on CPU, 2-rank gloo jobs under torchrun.
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q tests/python
