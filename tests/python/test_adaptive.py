"""Adaptive checkpoint intervals: Daly's formula, the MTBF update, the schedule."""

import math
import time

import pytest

from conftest import wait_until

from tierckpt.adaptive import daly_interval, interval_steps, mtbf_from_records


def daly_reference(d, m):
    if d >= 2 * m:
        return m
    return math.sqrt(2 * d * m) * (1 + math.sqrt(d / (2 * m)) / 3 + (d / (2 * m)) / 9) - d


def test_daly_known_values():
    # d = 2 s, M = 1 h: sqrt(14400) = 120; x = 1/3600; 120 * (1 + (1/60)/3 + (1/3600)/9) - 2
    assert daly_interval(2.0, 3600.0) == pytest.approx(120 * (1 + 1 / 180 + 1 / 32400) - 2, rel=1e-12)
    assert daly_interval(2.0, 3600.0) == pytest.approx(118.6704, abs=1e-3)
    # d = 50, M = 100: x = 0.25 -> sqrt(10000) * (1 + 0.5/3 + 0.25/9) - 50 = 69.444...
    assert daly_interval(50.0, 100.0) == pytest.approx(100 * (1 + 1 / 6 + 1 / 36) - 50, rel=1e-12)
    assert daly_interval(200.0, 100.0) == 100.0   # d >= 2M: M
    assert daly_interval(0.0, 100.0) == 0.0
    for d, m in [(0.1, 86400), (30, 3600), (1, 10), (19.9, 10)]:
        assert daly_interval(d, m) == pytest.approx(daly_reference(d, m), rel=1e-12)
    with pytest.raises(ValueError):
        daly_interval(1.0, 0.0)


def test_interval_grows_with_cost_and_shrinks_with_failures():
    now = time.time()
    steps = [interval_steps(d, 3600.0, 0.1, 1, 10**9) for d in (0.01, 0.1, 1.0, 10.0)]
    assert steps == sorted(steps) and len(set(steps)) == 4, steps
    start = {"unix_ms": int((now - 7200) * 1000), "kind": "start", "detail": "", "step": None, "restart": 0}
    fail = lambda k: {"unix_ms": int(now * 1000), "kind": k, "detail": "x", "step": 10, "restart": 1}
    m0 = mtbf_from_records(3600.0, [start], now)
    m2 = mtbf_from_records(3600.0, [start, fail("exit"), fail("signal")], now)
    m4 = mtbf_from_records(3600.0, [start] + [fail("hang")] * 4, now)
    assert m0 == pytest.approx(3600 + 7200, rel=1e-6)
    assert m2 == pytest.approx((3600 + 7200) / 3, rel=1e-6)
    assert m0 > m2 > m4
    i0, i2, i4 = (interval_steps(1.0, m, 0.1, 1, 10**9) for m in (m0, m2, m4))
    assert i0 > i2 > i4


def test_interval_clamped_and_conservative_without_measurements():
    assert interval_steps(None, 3600, 0.1, 7, 100) == 7
    assert interval_steps(1.0, 3600, None, 7, 100) == 7
    assert interval_steps(1e-9, 3600, 10.0, 7, 100) == 7
    assert interval_steps(100.0, 1e9, 1e-3, 7, 100) == 100
    assert 7 <= interval_steps(1.0, 3600, 1.0, 7, 100) <= 100


# --- the Checkpointer's schedule against a real daemon ----------------------

import torch

from tierckpt import Checkpointer, Client


def adaptive(daemon, ns, **cfg):
    return Checkpointer({"socket": daemon["socket"], "namespace": ns, "checkpoint_frequency": "adaptive",
                         "min_interval": 2, "max_interval": 10**6, "mtbf_s": 3600.0, **cfg},
                        rank=0, world_size=1)


def test_schedule_starts_conservative_and_follows_measurements(daemon):
    c = adaptive(daemon, "sched")
    saves = [s for s in range(1, 7) if c.should_save(s)]
    assert saves == [2, 4, 6]            # nothing measured yet: every min_interval steps
    c._cost.value, c._step_time.value = 1.0, 0.01   # injected: 1 s per checkpoint, 10 ms per step
    cheap = c.intervals()["memory"]
    c._cost.value = 4.0
    dear = c.intervals()["memory"]
    assert cheap < dear
    assert cheap == round(daly_interval(1.0, 3600.0) / 0.01)
    assert dear == round(daly_interval(4.0, 3600.0) / 0.01)
    c2 = adaptive(daemon, "clamp", max_interval=50)
    c2._cost.value, c2._step_time.value = 4.0, 0.01
    assert c2.intervals()["memory"] == 50


def test_real_saves_measure_cost_and_step_time(daemon):
    c = adaptive(daemon, "measured", min_interval=3)
    state = {"w": torch.zeros(1 << 20)}
    saved = []
    for step in range(1, 13):
        if c.should_save(step):
            c.save(step, state)
            saved.append(step)
    assert saved[0] == 3 and c._cost.count == len(saved) and c._step_time.count == 11
    assert c.last_intervals["cost_s"] > 0 and c.last_intervals["step_time_s"] > 0
    assert all(b - a >= 3 for a, b in zip(saved, saved[1:]))
    c.wait()
    assert c.latest_step() == saved[-1]


def test_recorded_failures_shorten_the_interval(daemon):
    c = adaptive(daemon, "flaky")
    cl = Client(daemon["socket"])
    now_ms = int(time.time() * 1000)
    cl.record_failure("flaky", "start", "job started", unix_ms=now_ms - 3_600_000)
    c._cost.value, c._step_time.value = 2.0, 0.01
    c._failures_cache = (float("-inf"), [])
    calm = c.intervals()
    assert calm["mtbf_s"] == pytest.approx(7200, rel=0.01)
    for i in range(3):
        cl.record_failure("flaky", "signal", "SIGKILL", step=100 * i, restart=i + 1)
    c._failures_cache = (float("-inf"), [])
    stormy = c.intervals()
    assert stormy["mtbf_s"] == pytest.approx(7200 / 4, rel=0.01)
    assert stormy["memory"] < calm["memory"]
    kinds = [r["kind"] for r in cl.failures("flaky")]
    assert kinds == ["start", "signal", "signal", "signal"]


def test_persistent_tier_gets_its_own_longer_interval(tmpdir_shm):
    import json as _json
    import subprocess

    from conftest import binary
    proc = subprocess.Popen([binary("tierckptd"), "--memory-dir", f"{tmpdir_shm}/mem", "--memory-tier-size", "64MiB",
                             "--persistent-path", f"file://{tmpdir_shm}/persist"],
                            stdout=subprocess.PIPE, text=True)
    try:
        ready = _json.loads(proc.stdout.readline())
        c = adaptive({"socket": ready["socket"]}, "persist", min_interval=2, mtbf_s=3600.0, persist_mtbf_s=36000.0)
        assert c.client.status()["persistent"]["url"].startswith("file://")
        tiers = {s: c.should_save(s) for s in range(1, 5)}
        assert tiers[2] == {"memory", "persistent"} and tiers[1] == set()
        c._cost.value, c._step_time.value = 1.0, 0.01
        iv = c.intervals()
        assert iv["persistent"] > iv["memory"] >= 2
        assert iv["persistent"] == round(daly_interval(1.0, 36000.0) / 0.01)
        c.save(4, {"w": torch.ones(8)}, tiers={"memory", "persistent"})
        c.wait()
        wait_until(lambda: any(ns.get("last_committed") == 4 for ns in
                               c.client.status()["persistent"]["namespaces"]), what="step 4 committed")
        c._status_cache = (float("-inf"), None)
        c._persistent_status()
        assert c._persist_cost.count == 1 and c._persist_cost.value > 0
    finally:
        proc.kill()
        proc.wait()


def test_ranks_of_a_torchrun_job_choose_the_same_adaptive_steps(daemon, tmp_path):
    import subprocess
    import sys

    from conftest import EXAMPLES, free_port, py_env
    out = tmp_path / "adaptive.txt"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                        str(EXAMPLES / "torch_train.py"), "--steps", "80", "--every", "adaptive",
                        "--out", str(out), "--namespace", "adapt"],
                       capture_output=True, text=True, timeout=300, env=py_env(TIERCKPT_SOCKET=daemon["socket"]))
    assert r.returncode == 0, r.stdout + r.stderr
    steps = Client(daemon["socket"]).list_steps("adapt")
    assert steps, "nothing was saved"
    assert all(s["complete"] and s["ranks"] == [0, 1] for s in steps), steps
    assert (out.parent / "adaptive.txt.rank0").read_text() == (out.parent / "adaptive.txt.rank1").read_text()
