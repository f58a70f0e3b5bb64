"""Preemption: a signal (or the daemon's notice) makes the Checkpointer save the next step, wait until it is
safe, and exit 75; `tierckpt run` passes that on as "preempted"; the job resumes bitwise from that very step."""

import re
import signal
import subprocess
import sys
import time

import pytest

from tierckpt import Client, Checkpointer
from tierckpt.preemption import EXIT_PREEMPTED

from conftest import EXAMPLES, binary, kill_tree, py_env, wait_until

SCRIPT = str(EXAMPLES / "torch_train.py")
STEPS = 80


def example(daemon, ns, out, *launcher, steps=STEPS, step_sleep="0.05"):
    """The example under `tierckpt run` (2 ranks), checkpointing only when asked (every 1000 steps)."""
    return [binary("tierckpt"), "--socket", daemon["socket"], "run", "--namespace", ns, *launcher, "--",
            sys.executable, SCRIPT, "--steps", str(steps), "--every", "1000", "--step-sleep", step_sleep,
            "--out", str(out), "--namespace", ns]


def run(cmd, timeout=300):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=py_env())
    return r.returncode, r.stdout + r.stderr


def digests(out):
    return [open(f"{out}.rank{r}").read().strip() for r in range(2)]


def start_then_signal(cmd, sig, started_lines=2):
    """Starts `cmd`, waits until every rank started training, lets it train a second, sends `sig`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=py_env(),
                            start_new_session=True)
    lines = []
    try:
        while "".join(lines).count("starting from scratch") < started_lines:
            line = proc.stdout.readline()
            assert line, "the job ended before training: " + "".join(lines)
            lines.append(line)
        time.sleep(1.0)  # mid-training: 80 steps take 4 s at least
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    return proc.returncode, "".join(lines) + rest


def test_sigterm_under_tierckpt_run_checkpoints_the_next_step_and_resumes_bitwise_from_it(daemon, tmp_path):
    code, log = run(example(daemon, "ref", tmp_path / "ref", "--nproc-per-node", "2"))
    assert code == 0, log
    reference = digests(tmp_path / "ref")

    code, log = start_then_signal(example(daemon, "pre", tmp_path / "out", "--nproc-per-node", "2"), signal.SIGTERM)
    assert code == EXIT_PREEMPTED, log
    saved = {int(m) for m in re.findall(r"SIGTERM: saving step (\d+)", log)}
    assert len(saved) == 1, f"both ranks saved the same step: {log}"
    step = saved.pop()
    assert 1 <= step < STEPS, log
    assert log.count(f"step {step} is safe") == 2, log
    assert "preempted (SIGTERM" in log, log
    c = Client(daemon["socket"])
    assert c.latest("pre") == step, "the step saved for the preemption is complete"
    kinds = [r["kind"] for r in c.failures("pre")]
    assert kinds == ["start", "preempted"], kinds

    code, log = run(example(daemon, "pre", tmp_path / "out", "--nproc-per-node", "2"))
    assert code == 0, log
    assert log.count(f"resumed from step {step}") == 2, log
    assert digests(tmp_path / "out") == reference, "bitwise equal to the uninterrupted run"


def test_sigusr1_without_a_supervisor_and_the_grace_fallback(daemon, tmp_path):
    cmd = [sys.executable, SCRIPT, "--steps", str(STEPS), "--every", "1000", "--step-sleep", "0.05",
           "--out", str(tmp_path / "one"), "--namespace", "usr1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=py_env(TIERCKPT_SOCKET=daemon["socket"]), start_new_session=True)
    try:
        assert "starting from scratch" in proc.stdout.readline()
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        log, _ = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    assert proc.returncode == EXIT_PREEMPTED, log
    step = int(re.search(r"SIGUSR1: saving step (\d+)", log).group(1))
    assert Client(daemon["socket"]).latest("usr1") == step


def test_bad_preemption_settings_are_named(daemon):
    for cfg, what in (({"preemption_signals": ["SIGBOGUS"]}, "unknown signal name 'SIGBOGUS'"),
                      ({"preemption_signals": "SIGTERM"}, "preemption_signals"),
                      ({"preemption_signals": ["SIGKILL"]}, "cannot be caught"),
                      ({"preemption_grace_s": 0}, "preemption_grace_s"),
                      ({"preemption_exit": "yes"}, "preemption_exit")):
        with pytest.raises(ValueError, match=what):
            Checkpointer({"socket": daemon["socket"], "namespace": "bad", **cfg})
    ck = Checkpointer({"socket": daemon["socket"], "namespace": "names", "preemption_signals": ["term", "USR2"]})
    try:
        assert ck.config["preemption_signals"] == ["SIGTERM", "SIGUSR2"]
        assert callable(signal.getsignal(signal.SIGUSR2)), "the Checkpointer handles SIGUSR2"
    finally:
        ck.close()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL, "close() put the previous handler back"


def test_a_dropped_checkpointer_gives_the_signal_back(daemon, tmp_path):
    """A Checkpointer dropped without close(): its handler no longer swallows the signal."""
    code = (f"import gc, os, signal, time, tierckpt\n"
            f"c = tierckpt.Checkpointer({{'socket': {daemon['socket']!r}, 'namespace': 'dropped'}})\n"
            f"del c; gc.collect()\n"
            f"os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('survived')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=py_env())
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stdout, r.stderr)
