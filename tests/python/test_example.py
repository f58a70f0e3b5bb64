"""examples/torch_train.py killed mid-run and resumed: bitwise the same as an uninterrupted run."""

import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from tierckpt import Client

from conftest import EXAMPLES, binary, free_port, kill_tree, py_env, wait_until

SCRIPT = str(EXAMPLES / "torch_train.py")
STEPS = 120


def run_example(daemon, out, ns, *extra, steps=STEPS, timeout=300):
    r = subprocess.run([sys.executable, SCRIPT, "--steps", str(steps), "--every", "5", "--out", str(out),
                        "--namespace", ns, *extra], capture_output=True, text=True, timeout=timeout,
                       env=py_env(TIERCKPT_SOCKET=daemon["socket"]))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def torchrun_cmd(out, ns, *extra, max_restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--max-restarts", str(max_restarts), "--monitor-interval", "0.5",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            SCRIPT, "--steps", str(STEPS), "--every", "5", "--out", str(out), "--namespace", ns, *extra]


def worker_pids(out) -> dict:
    """rank -> pid of the example's worker processes writing to `out` (not torchrun, not a supervisor)."""
    found = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmd]
        if str(out) not in args or SCRIPT not in args or "torch.distributed.run" in args:
            continue
        if not args[0].endswith(("python", "python3")) and "python" not in os.path.basename(args[0]):
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), 0)
        found[rank] = int(d.name)
    return found


def latest(daemon, ns):
    return Client(daemon["socket"]).latest(ns)


def digest(path):
    return pathlib.Path(path).read_text().strip()


@pytest.fixture
def reference(daemon, tmp_path):
    out = tmp_path / "ref.txt"
    stdout = run_example(daemon, out, "ref")
    assert "starting from scratch" in stdout
    return digest(out)


def test_single_process_sigkill_then_resume_is_bitwise_identical(daemon, tmp_path, reference):
    out = tmp_path / "crash.txt"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--steps", str(STEPS), "--every", "5", "--out", str(out),
                             "--namespace", "crash", "--step-sleep", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=py_env(TIERCKPT_SOCKET=daemon["socket"]))
    try:
        wait_until(lambda: (latest(daemon, "crash") or 0) >= 30 or proc.poll() is not None,
                   what="a checkpoint at step >= 30")
        assert proc.poll() is None, "the job finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        kill_tree(proc)
    assert not out.exists()
    killed_at = latest(daemon, "crash")
    stdout = run_example(daemon, out, "crash")
    m = re.search(r"resumed from step (\d+)", stdout)
    assert m, stdout
    assert int(m.group(1)) >= 30 and int(m.group(1)) >= killed_at
    assert digest(out) == reference


@pytest.fixture
def reference_2rank(daemon, tmp_path):
    out = tmp_path / "ref2.txt"
    r = subprocess.run(torchrun_cmd(out, "ref2"), capture_output=True, text=True, timeout=300,
                       env=py_env(TIERCKPT_SOCKET=daemon["socket"]))
    assert r.returncode == 0, r.stdout + r.stderr
    refs = [digest(f"{out}.rank{r}") for r in (0, 1)]
    assert refs[0] == refs[1]  # DDP keeps the replicas (weights and Adam state) identical
    return refs


def kill_worker_when_checkpointed(daemon, proc, out, ns, rank=1, at=30):
    wait_until(lambda: (latest(daemon, ns) or 0) >= at or proc.poll() is not None,
               what=f"a checkpoint at step >= {at}", timeout=180)
    assert proc.poll() is None, "the job finished before it could be killed"
    pids = wait_until(lambda: worker_pids(out).get(rank), what=f"rank {rank}'s worker")
    os.kill(pids, signal.SIGKILL)
    return pids


def test_torchrun_two_ranks_worker_killed_restarts_and_resumes_bitwise(daemon, tmp_path, reference_2rank):
    out = tmp_path / "ddp.txt"
    proc = subprocess.Popen(torchrun_cmd(out, "ddp", "--step-sleep", "0.05", max_restarts=1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=py_env(TIERCKPT_SOCKET=daemon["socket"]))
    kill_then_check_two_ranks_resumed_bitwise(daemon, proc, out, "ddp", reference_2rank)


def kill_then_check_two_ranks_resumed_bitwise(daemon, proc, out, ns, reference_2rank):
    """Kills a worker of a 2-rank job once it checkpointed; checks both ranks resumed and ended bitwise equal."""
    try:
        kill_worker_when_checkpointed(daemon, proc, out, ns)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, stdout
    resumed = [int(k) for k in re.findall(r"rank \d: resumed from step (\d+)", stdout)]
    assert len(resumed) == 2 and resumed[0] == resumed[1] and resumed[0] >= 30, stdout
    assert [digest(f"{out}.rank{r}") for r in (0, 1)] == reference_2rank


def supervise(daemon, ns, cmd, max_restarts=2):
    return subprocess.Popen([binary("tierckpt"), "run", "--max-restarts", str(max_restarts), "--backoff", "100ms",
                             "--hang-timeout", "60s", "--namespace", ns, "--socket", daemon["socket"], "--", *cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=py_env())


def test_supervisor_restarts_a_killed_trainer_to_bitwise_identical(daemon, tmp_path, reference):
    out = tmp_path / "sup.txt"
    proc = supervise(daemon, "sup", [sys.executable, SCRIPT, "--steps", str(STEPS), "--every", "5",
                                     "--out", str(out), "--step-sleep", "0.05"])
    try:
        kill_worker_when_checkpointed(daemon, proc, out, "sup", rank=0)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, stdout
    m = re.search(r"resumed from step (\d+)", stdout)
    assert m and int(m.group(1)) >= 30, stdout
    assert digest(out) == reference
    kinds = [r["kind"] for r in Client(daemon["socket"]).failures("sup")]
    assert kinds.count("start") >= 1 and "signal" in kinds, kinds


def test_supervisor_wrapping_torchrun_restarts_to_bitwise_identical(daemon, tmp_path, reference_2rank):
    out = tmp_path / "supddp.txt"
    proc = supervise(daemon, "supddp", torchrun_cmd(out, "supddp", "--step-sleep", "0.05"))
    kill_then_check_two_ranks_resumed_bitwise(daemon, proc, out, "supddp", reference_2rank)
    kinds = [r["kind"] for r in Client(daemon["socket"]).failures("supddp")]
    assert len([k for k in kinds if k != "start"]) >= 1, kinds
