"""Fixtures: a real tierckptd process on a tmpfs directory."""

import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"


def binary(name: str) -> str:
    path = TARGET / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build` first")
    return str(path)


@pytest.fixture
def daemon():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="tierckpt-py-", dir=base)
    proc = subprocess.Popen(
        [binary("tierckptd"), "--memory-dir", f"{tmp}/mem", "--memory-tier-size", "256MiB",
         "--http-addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "TIERCKPT_LOG": "warn"},
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready", ready
        yield {"socket": ready["socket"], "http": ready["http_addr"], "dir": tmp}
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def tierckpt(socket: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("tierckpt"), "--socket", socket, *args],
                          capture_output=True, text=True, check=False)
