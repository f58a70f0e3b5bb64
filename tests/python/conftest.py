"""Fixtures: a real tierckptd process on a tmpfs directory."""

import json
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
# As root a daemon mounts a huge-page tmpfs on a new memory directory by default; the mount would outlive
# the temporary directories the tests remove.
os.environ.setdefault("TIERCKPT_MOUNT_HUGE_TMPFS", "false")


def binary(name: str) -> str:
    path = TARGET / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build` first")
    return str(path)


def run_daemon(*extra: str):
    """A real tierckptd on a fresh tmpfs directory (more flags in `extra`); yields its socket, HTTP address, the
    bearer token its HTTP API wants (passed by environment, never on the command line), and its dir."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="tierckpt-py-", dir=base)
    token = secrets.token_hex(16)
    proc = subprocess.Popen(
        [binary("tierckptd"), "--memory-dir", f"{tmp}/mem", "--memory-tier-size", "256MiB",
         "--http-addr", "127.0.0.1:0", *[a.replace("{dir}", tmp) for a in extra]],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "TIERCKPT_LOG": "warn", "TIERCKPT_TOKEN": token},
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready", ready
        yield {"socket": ready["socket"], "http": ready["http_addr"], "token": token, "dir": tmp}
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def daemon():
    yield from run_daemon()


@pytest.fixture
def draining_daemon():
    """A daemon that drains every complete checkpoint to `file://<dir>/store`, unless a shard says otherwise."""
    yield from run_daemon("--persistent-path", "file://{dir}/store", "--persist-every", "1", "--persist-keep-last", "20")


def tierckpt(socket: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("tierckpt"), "--socket", socket, *args],
                          capture_output=True, text=True, check=False)


# --- the Python package, its examples, and daemons for them ---------------

import signal
import socket as _socket
import sys
import time

PYTHON_SRC = ROOT / "python"
EXAMPLES = ROOT / "examples"
if str(PYTHON_SRC) not in sys.path:
    sys.path.insert(0, str(PYTHON_SRC))  # test the working tree, not a stale install


def py_env(**extra) -> dict:
    """Environment for a Python child: the working tree's package first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PYTHON_SRC), os.environ.get("PYTHONPATH", "")]),
           "TIERCKPT_LOG": "warn", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout=120.0, what="condition", interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILLs a process started with start_new_session=True and its group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture
def two_nodes(tmpdir_shm):
    """Two clustered daemons (n0, n1) on 127.0.0.1, both seen alive: `(processes, sockets)`."""
    ports = [free_port(), free_port()]
    nodes = ",".join(f"n{i}=127.0.0.1:{p}" for i, p in enumerate(ports))
    env = {**os.environ, "TIERCKPT_LOG": "error", "TIERCKPT_TOKEN": secrets.token_hex(16)}
    procs = []
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [binary("tierckptd"), "--memory-dir", str(tmpdir_shm / f"n{i}"), "--memory-tier-size", "128MiB",
                 "--node-id", f"n{i}", "--nodes", nodes, "--heartbeat-interval", "100ms",
                 "--heartbeat-timeout", "600ms"], stdout=subprocess.PIPE, text=True, env=env))
        sockets = [json.loads(p.stdout.readline())["socket"] for p in procs]
        from tierckpt import Client
        c0 = Client(sockets[0])
        wait_until(lambda: all(n["state"] == "alive" for n in c0.status()["cluster"]["nodes"]), what="both alive")
        yield procs, sockets
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture
def tmpdir_shm():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="tierckpt-py-", dir=base)
    try:
        yield pathlib.Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
