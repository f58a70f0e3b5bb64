"""`python -m tierckpt.bench`: its report has every figure, its restores are checked bitwise, it cleans up."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from tierckpt import bench

from conftest import binary, py_env

SAVES = ("tierckpt", "tierckpt_sync", "torch_save", "dcp_save", "dcp_async_save", "dcp_async_save_stager",
         "dcp_save_tierckpt", "dcp_async_save_tierckpt")
RESTORES = ("floor", "tierckpt", "dcp_load", "dcp_load_tierckpt", "torch_load")


def run_bench(workdir, *args, timeout=300):
    env = py_env(TIERCKPT_DAEMON_BIN=binary("tierckptd"))
    env.pop("TIERCKPT_SOCKET", None)  # the bench starts its own daemon
    return subprocess.run([sys.executable, "-m", "tierckpt.bench", "--workdir", str(workdir), *args],
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def positive(x, what):
    assert isinstance(x, (int, float)) and not isinstance(x, bool), f"{what}: {x!r} is not a number"
    assert math.isfinite(x) and x > 0, f"{what}: {x!r} is not a positive number"


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone too: it no longer runs
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_bench_json_has_every_figure_and_bitwise_restores(tmpdir_shm):
    r = run_bench(tmpdir_shm, "--size", "8MB", "--json", "--device", "cpu", "--saves", "2", "--warmup", "1",
                  "--restores", "2")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["mode"] == "save" and rep["device"] == "cpu" and rep["size"] == 8_000_000
    positive(rep["bytes_total"], "bytes_total")
    assert rep["daemon"]["started_by_bench"] is True and rep["daemon"]["build"] in ("debug", "release")
    fl = rep["floor"]
    for k in ("save_s", "first_save_s", "restore_s"):
        positive(fl[k], f"floor.{k}")
    for m in SAVES:
        s = rep["save"][m]
        assert "skipped" not in s, f"{m} skipped: {s.get('skipped')}"
        assert s["n"] == 2 and len(s["each"]["visible_s"]) == 2 and len(s["warmup_visible_s"]) == 1
        for part in ("first", "steady"):
            for k in ("blocked_s", "free_s", "visible_s"):
                positive(s[part][k], f"save.{m}.{part}.{k}")
            # blocked <= free <= visible: each is measured from the same start
            assert s[part]["blocked_s"] <= s[part]["free_s"] <= s[part]["visible_s"], (m, part, s[part])
        for part in ("ratio", "first_ratio"):
            for k in ("blocked", "free", "visible"):
                positive(s[part][k], f"save.{m}.{part}.{k}")
    bb = rep["save"]["tierckpt"]["back_to_back"]
    for k in ("blocked_s", "max_blocked_s", "all_visible_s", "ratio"):
        positive(bb[k], f"back_to_back.{k}")
    assert rep["save"]["dcp_async_save_stager"]["options"]["use_async_staging"] is True
    # DCP through tierckpt, beside the Checkpointer row it stands for
    for m, of in (("dcp_save_tierckpt", "tierckpt_sync"), ("dcp_async_save_tierckpt", "tierckpt")):
        v = rep["save"][m]["vs_checkpointer"]
        assert v["of"] == of, (m, v)
        for k in ("blocked", "free", "visible"):
            positive(v[k], f"save.{m}.vs_checkpointer.{k}")
            positive(v["rows"][k], f"save.{m}.vs_checkpointer.rows.{k}")
    assert rep["interleaved"]["n"] == 2
    for m in ("tierckpt_sync", "dcp_save_tierckpt", "tierckpt", "dcp_async_save_tierckpt"):
        assert len(rep["interleaved"]["each_blocked_s"][m]) == 2, m
        positive(rep["interleaved"]["median"][m]["blocked_s"], f"interleaved.{m}")
    assert rep["restore"]["dcp_load_tierckpt"]["vs_checkpointer"]["of"] == "tierckpt"
    positive(rep["restore"]["dcp_load_tierckpt"]["vs_checkpointer"]["s"], "restore.dcp_load_tierckpt.vs_checkpointer")
    for m in RESTORES:
        x = rep["restore"][m]
        positive(x["s"], f"restore.{m}.s")
        positive(x["ratio"], f"restore.{m}.ratio")
        assert x["bitwise"] is True, f"restore {m} was not bitwise identical"
    assert rep["restore"]["floor"]["ratio"] == 1.0
    assert rep["bitwise"] is True
    b = rep["bytes"]
    assert b["state"] == rep["bytes_total"]
    for k in ("tierckpt_shard", "torch_save_file", "dcp_save_dir", "dcp_async_save_dir", "dcp_async_save_stager_dir"):
        assert b[k] >= b["state"], (k, b[k])
    # it cleaned up: its daemon stopped, its scratch directory removed
    assert gone(rep["daemon"]["pid"]), f"the bench's daemon (pid {rep['daemon']['pid']}) still runs"
    assert list(tmpdir_shm.iterdir()) == []


def test_bench_table_is_the_default(tmpdir_shm):
    r = run_bench(tmpdir_shm, "--size", "1MB", "--device", "cpu", "--saves", "1", "--warmup", "0", "--restores", "1")
    assert r.returncode == 0, r.stderr
    for word in ("floor", "tierckpt", "back to back", "torch_save", "dcp_async_save_stager", "dcp_load",
                 "torch_load", "bitwise", "bytes:", "tierckpt_sync", "dcp_save_tierckpt", "dcp_async_save_tierckpt",
                 "x tierckpt_sync", "dcp_load_tierckpt"):
        assert word in r.stdout, f"{word!r} missing from the table:\n{r.stdout}"


def test_bench_train_mode_reports_the_overhead(tmpdir_shm):
    r = run_bench(tmpdir_shm, "--size", "1MB", "--json", "--device", "cpu", "--mode", "train", "--steps", "3",
                  "--warmup", "1", "--step-ms", "20")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["train"]
    assert t["steps"] == 3 and t["warmup"] == 1 and t["step_ms"] == 20 and t["step_kind"] == "matmul"
    assert len(t["tierckpt"]["warmup_step_s"]) == 1
    positive(t["no_checkpoint"]["step_s"], "no_checkpoint.step_s")
    positive(t["tierckpt"]["step_s"], "tierckpt.step_s")
    positive(t["tierckpt"]["blocked_s"], "tierckpt.blocked_s")
    assert isinstance(t["tierckpt"]["overhead"], float) and math.isfinite(t["tierckpt"]["overhead"])


def test_bench_refuses_a_bad_size(tmpdir_shm):
    r = run_bench(tmpdir_shm, "--size", "lots", "--json")
    assert r.returncode == 2
    assert "--size 'lots'" in r.stderr


def test_bench_restore_check_catches_a_restore_that_copies_nothing(daemon, tmpdir_shm):
    """The bitwise check is real: a "restore" that leaves the clobbered state is reported as not bitwise."""
    args = argparse.Namespace(size=1 << 20, tensors=4, dtype="bf16", device="cpu", fresh="bytes")
    d = bench.Daemon(daemon["socket"], args.size, str(tmpdir_shm))
    b = bench.Bench(args, str(tmpdir_shm), d)
    try:
        b.fresh()
        _, ok = b._restore(lambda: None)
        assert ok is False
        _, ok = b.restore_floor()
        assert ok is True
    finally:
        b.close()


@pytest.mark.parametrize("text,n", [("8MB", 8_000_000), ("1GiB", 1 << 30), ("512MiB", 512 << 20), ("4096", 4096)])
def test_bench_sizes(text, n):
    assert bench.parse_size(text) == n


def test_bench_train_mode_reports_a_failed_save(tmpdir_shm):
    """A daemon too small for one save: the report names the failed save and the bench exits 1, with its JSON."""
    proc = subprocess.Popen([binary("tierckptd"), "--memory-dir", str(tmpdir_shm / "mem"), "--socket",
                             str(tmpdir_shm / "d.sock"), "--memory-tier-size", "1MiB"],
                            stdout=subprocess.PIPE, text=True, env=py_env())
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready", ready
        work = tmpdir_shm / "work"
        work.mkdir()
        r = run_bench(work, "--size", "2MB", "--json", "--device", "cpu", "--mode", "train", "--steps", "2",
                      "--warmup", "0", "--step-ms", "5", "--socket", ready["socket"])
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert r.returncode == 1, (r.stdout, r.stderr)
    rep = json.loads(r.stdout)
    assert rep["daemon"]["started_by_bench"] is False
    err = rep["train"]["tierckpt"]["error"]
    assert err.startswith("save 1 of 2 (step 1) failed: capacity exceeded"), err
    assert rep["train"]["tierckpt"]["daemon_memory"]["capacity"] == 1 << 20
    assert rep["error"] == err and "capacity exceeded" in r.stderr


def test_bench_without_a_daemon_says_how_to_get_one(tmpdir_shm):
    env = py_env(PATH="/usr/bin:/bin")
    for k in ("TIERCKPT_SOCKET", "TIERCKPT_DAEMON_BIN"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "tierckpt.bench", "--size", "1MB", "--workdir", str(tmpdir_shm)],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "error: no daemon to benchmark: set TIERCKPT_SOCKET" in r.stderr and "Traceback" not in r.stderr
    assert list(tmpdir_shm.iterdir()) == []
