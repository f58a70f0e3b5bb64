#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, integration with real daemon
# processes on 127.0.0.1 and tmpfs, property tests), then the Python tests in
# a virtual environment this script creates. Needs cargo and python3 >= 3.10.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo build"
cargo build --workspace --all-targets --locked

echo "== cargo test"
cargo test --workspace --locked

echo "== python tests"
VENV="${TIERCKPT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
"$VENV/bin/python" -m pytest -q tests/python
