"""Preemption: a signal (or the daemon's notice) makes the Checkpointer save the next step, wait until it is
safe, and exit 75; `tierckpt run` passes that on as "preempted"; the job resumes bitwise from that very step."""

import datetime
import http.server
import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tierckpt import Client, Checkpointer
from tierckpt.preemption import EXIT_PREEMPTED

from conftest import EXAMPLES, binary, kill_tree, py_env, run_daemon, wait_until

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


def start_then(cmd, act, started_lines=2):
    """Starts `cmd`, waits until every rank started training, lets it train a second, calls `act(proc)`;
    returns its exit code and output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=py_env(),
                            start_new_session=True)
    lines = []
    try:
        while "".join(lines).count("starting from scratch") < started_lines:
            line = proc.stdout.readline()
            assert line, "the job ended before training: " + "".join(lines)
            lines.append(line)
        time.sleep(1.0)  # mid-training: 80 steps take 4 s at least
        act(proc)
        rest, _ = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    return proc.returncode, "".join(lines) + rest


def test_sigterm_under_tierckpt_run_checkpoints_the_next_step_and_resumes_bitwise_from_it(daemon, tmp_path):
    code, log = run(example(daemon, "ref", tmp_path / "ref", "--nproc-per-node", "2"))
    assert code == 0, log
    reference = digests(tmp_path / "ref")

    code, log = start_then(example(daemon, "pre", tmp_path / "out", "--nproc-per-node", "2"),
                           lambda proc: proc.send_signal(signal.SIGTERM))
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
    code = (f"import gc, os, signal, tierckpt\n"
            f"c = tierckpt.Checkpointer({{'socket': {daemon['socket']!r}, 'namespace': 'dropped'}})\n"
            f"del c; gc.collect()\n"
            f"os.kill(os.getpid(), signal.SIGTERM); print('survived')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=py_env())
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stdout, r.stderr)


# -- the daemon's advice: a notice URL, a failed health check, a suspect neighbour ---------------------------

class SpotNotice:
    """A local HTTP server answering as a cloud's spot notice does: 404 until `post()`, then 200 with EC2's
    JSON (the action and its time)."""

    def __init__(self):
        self.posted = None
        notice = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if notice.posted is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps({"action": "terminate", "time": notice.posted}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/latest/meta-data/spot/instance-action"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def post(self, in_s=30):
        t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=in_s)
        self.posted = t.strftime("%Y-%m-%dT%H:%M:%SZ")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_notice_url_preempts_the_job_which_resumes_bitwise_from_the_step_saved(tmp_path):
    spot = SpotNotice()
    daemons = run_daemon("--preemption-notice", spot.url, "--preemption-notice-every", "50ms")
    daemon = next(daemons)
    try:
        code, log = run(example(daemon, "ref", tmp_path / "ref", "--nproc-per-node", "2"))
        assert code == 0, log
        reference = digests(tmp_path / "ref")
        code, log = start_then(example(daemon, "spot", tmp_path / "out", "--nproc-per-node", "2"),
                               lambda proc: spot.post())
        assert code == EXIT_PREEMPTED, log
        (step,) = {int(m) for m in re.findall(r"preemption notice: .*?: saving step (\d+)", log)}
        c = Client(daemon["socket"])
        assert c.latest("spot") == step
        kinds = [r["kind"] for r in c.failures("spot")]
        assert "alert" in kinds and kinds[-1] == "preempted", kinds

        spot.posted = None  # the node came back (a new one): no notice
        wait_until(lambda: "preemption" not in c.advice("spot"), what="the notice withdrawn")
        code, log = run(example(daemon, "spot", tmp_path / "out", "--nproc-per-node", "2"))
        assert code == 0, log
        assert log.count(f"resumed from step {step}") == 2, log
        assert digests(tmp_path / "out") == reference
    finally:
        daemons.close()
        spot.close()


def steps_saved(ck, steps, step_s=0.05):
    """Runs `should_save` over `steps` of `step_s` each; returns the steps it asked to save."""
    asked = []
    for s in steps:
        time.sleep(step_s)  # a step: the Checkpointer asks the daemon at most every 0.1 s
        if ck.should_save(s):
            ck.save(s, {"w": torch_full(s)})
            asked.append(s)
    return asked


def torch_full(s):
    import torch
    return torch.full((1000,), float(s))


def test_a_failed_health_check_saves_the_next_step_once(tmp_path):
    sick = tmp_path / "sick"
    daemons = run_daemon("--health-check-command", f"test ! -e {sick}", "--health-check-every", "50ms")
    daemon = next(daemons)
    try:
        ck = Checkpointer({"socket": daemon["socket"], "namespace": "health", "checkpoint_frequency": 1000})
        assert steps_saved(ck, range(1, 6)) == [], "nothing asked while healthy"
        sick.write_text("gpu fell off the bus\n")
        c = Client(daemon["socket"])
        wait_until(lambda: c.advice("health")["events"], what="the failed check")
        asked = steps_saved(ck, range(6, 30))
        assert len(asked) == 1 and asked[0] <= 8, f"a step within 0.1 s, once: {asked}"
        ck.wait()
        assert c.latest("health") == asked[0]
        ck.close()
    finally:
        daemons.close()


def test_a_suspect_neighbour_saves_the_next_step(two_nodes):
    procs, sockets = two_nodes
    c0 = Client(sockets[0])
    ck = Checkpointer({"socket": sockets[0], "namespace": "suspect", "checkpoint_frequency": 1000})
    assert steps_saved(ck, range(1, 4)) == []
    procs[1].send_signal(signal.SIGSTOP)
    try:
        ev = wait_until(lambda: c0.advice("suspect")["events"], what="n1 suspect")
        assert ev[0]["kind"] == "suspect_neighbour" and "n1" in ev[0]["detail"], ev
        asked = steps_saved(ck, range(4, 20))
        assert len(asked) == 1 and asked[0] <= 6, f"a step within 0.1 s, once: {asked}"
    finally:
        procs[1].send_signal(signal.SIGCONT)
    ck.wait()
    ck.close()


def test_a_preemption_persists_the_step_too_when_the_grace_allows(draining_daemon):
    """With a persistent tier whose drain time is measured and well within the grace, the step saved for the
    preemption is committed there too before the exit."""
    code = (f"import time, torch, tierckpt\n"
            f"c = tierckpt.Checkpointer({{'socket': {draining_daemon['socket']!r}, 'namespace': 'graced', "
            f"'checkpoint_frequency': 2}})\n"
            f"for step in range(1, 10_000):\n"
            f"    time.sleep(0.05)\n"
            f"    if c.should_save(step):\n"
            f"        c.save(step, {{'w': torch.full((10_000,), float(step))}})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=py_env(), start_new_session=True)
    try:
        c = Client(draining_daemon["socket"])
        wait_until(lambda: (c.status().get("persistent") or {}).get("namespaces")
                   and any((n.get("last_committed") or 0) >= 6 for n in c.status()["persistent"]["namespaces"]),
                   what="steps drained, so that the drain time is measured")
        proc.send_signal(signal.SIGUSR1)
        log, _ = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    assert proc.returncode == EXIT_PREEMPTED, log
    step = int(re.search(r"SIGUSR1: saving step (\d+) to memory, persistent", log).group(1))
    assert f"step {step} is safe (memory, persisted)" in log, log
    committed = [n["last_committed"] for n in Client(draining_daemon["socket"]).status()["persistent"]["namespaces"]
                 if n["namespace"] == "graced"]
    assert committed == [step], committed


def test_a_checkpointer_is_freed_as_soon_as_it_is_dropped(daemon):
    """No reference cycle through its preemption watch: dropped unclosed, it is freed (and its segments
    unmapped by its finalizer) at once, not at some later garbage collection."""
    import gc
    import weakref
    gc.disable()
    try:
        ck = Checkpointer({"socket": daemon["socket"], "namespace": "freed"})
        ck.save(1, {"w": torch_full(1)})
        ref = weakref.ref(ck)
        del ck
        assert ref() is None, "kept alive by a cycle"
    finally:
        gc.enable()
