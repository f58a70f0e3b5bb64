"""In-process recovery (`tierckpt.inprocess`): a rank of a gloo job is SIGKILLed; the survivors keep their
processes, rebuild the process group with the replacement and roll back from their node's memory; every rank
ends bitwise equal to an uninterrupted run. By hand (2 ranks), under `tierckpt run --nproc-per-node 4` (beside
its full restart), and under torchrun (which restarts every rank)."""

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from conftest import binary, py_env, wait_until
from tierckpt.recovery_job import read_events

WORLD = 2


def start(rank, tmp, socket, ns, generation, tag):
    env = py_env(RANK=rank, WORLD_SIZE=WORLD, LOCAL_WORLD_SIZE=WORLD, TIERCKPT_SOCKET=socket,
                 TIERCKPT_NAMESPACE=ns, TIERCKPT_STORE_FILE=tmp / f"store-{tag}",
                 TIERCKPT_GENERATION=generation)
    return subprocess.Popen([sys.executable, "-m", "tierckpt.recovery_job", "--steps", "60",
                             "--events-dir", str(tmp / f"events-{tag}")], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / f"err-{tag}.{rank}", "w"))


def run_by_hand(tmp, socket, kill_at=None):
    """Starts the ranks itself and, after a kill, starts only the killed rank again (a launcher's part)."""
    tag = uuid.uuid4().hex[:8]
    ns = f"inproc-{tag}"
    events = str(tmp / f"events-{tag}")
    procs = [start(r, tmp, socket, ns, 0, tag) for r in range(WORLD)]
    try:
        if kill_at is not None:
            wait_until(lambda: any(e.get("step", 0) >= kill_at for e in read_events(events, 1)),
                       what="rank 1 at the kill step")
            procs[1].send_signal(signal.SIGKILL)
            procs[1].wait()
            procs[1] = start(1, tmp, socket, ns, 1, tag)
        for r, p in enumerate(procs):
            assert p.wait(timeout=180) == 0, (tmp / f"err-{tag}.{r}").read_text()
        ev = [read_events(events, r) for r in range(WORLD)]
        return [[e for e in x if e["event"] == "done"][-1]["digest"] for x in ev], ev
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_killed_rank_is_replaced_and_the_survivor_rolls_back_in_its_process(daemon, tmp_path):
    reference, _ = run_by_hand(tmp_path, daemon["socket"])
    outs, ev = run_by_hand(tmp_path, daemon["socket"], kill_at=23)
    assert outs == reference, "bitwise equal to the uninterrupted run"
    survivor = ev[0]
    assert len({e["pid"] for e in survivor}) == 1, "rank 0 kept its process"
    resumes = [e for e in survivor if e["event"] == "resumed"]
    assert [r["generation"] for r in resumes] == [0, 1] and resumes[1]["in_process"], resumes
    assert resumes[1]["step"] == 20, "rolled back to the newest checkpoint every rank holds"
    assert len(resumes[1]["failures"]) == 1 and resumes[1]["failures"][0][2] > 0, resumes[1]
    assert resumes[1]["error_at"] < resumes[1]["group_at"] < resumes[1]["restored_at"], resumes[1]
    replacement = [e for e in ev[1] if e["event"] == "resumed"][-1]
    assert (replacement["generation"], replacement["in_process"], replacement["step"]) == (1, False, 20), replacement
    steps = [e["step"] for e in survivor if e["event"] == "step"]
    assert steps.count(21) == 2 and steps[-1] == 60, "steps after the checkpoint were redone"


def recovery_bench(tmp, *args):
    env = py_env(TIERCKPT_DAEMON_BIN=binary("tierckptd"), TIERCKPT_BIN=binary("tierckpt"))
    env.pop("TIERCKPT_SOCKET", None)  # the bench starts its own daemon
    r = subprocess.run([sys.executable, "-m", "tierckpt.recovery_bench", "--workdir", str(tmp), "--json", *args],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def check_split(r):
    for phase in ("detection", "rendezvous", "restore", "first_step"):
        assert r[phase] is not None and r[phase] >= 0, (phase, r)
    assert abs(sum(r[p] for p in ("detection", "rendezvous", "restore", "first_step")) - r["total"]) < 1e-6, r
    assert r["bitwise_equal"], "every rank ends bitwise equal to the uninterrupted run"
    assert r["rolled_back_to"] == 20 and r["steps_redone"] >= 3, r


def test_four_ranks_a_warm_spare_beside_a_full_restart_and_torchrun(tmpdir_shm):
    rep = recovery_bench(tmpdir_shm, "--ranks", "4", "--steps", "30", "--kill-step", "23", "--kill-rank", "2",
                         "--launchers", "in-process-spare,full-restart,torchrun")
    spare, full = rep["launchers"]["in-process-spare"], rep["launchers"]["full-restart"]
    for r in rep["launchers"].values():
        check_split(r)
    assert rep["launchers"]["torchrun"]["ranks_kept_process"] == 0, rep
    assert spare["ranks_kept_process"] == 3 and spare["in_process"] == [True, True, False, True], spare
    assert full["ranks_kept_process"] == 0 and not any(full["in_process"]), full
    assert full["vs_full_restart"] == 1.0 and spare["vs_full_restart"] > 0, rep
    assert rep["reference_train_s"] > 0 and 0 < spare["goodput"] < 2, rep
    assert not [p for p in os.listdir(tmpdir_shm)], "the bench removed its events, logs and daemon"


def test_two_ranks_in_process_under_tierckpt_run_and_torchrun_restarting_all(tmpdir_shm):
    rep = recovery_bench(tmpdir_shm, "--ranks", "2", "--steps", "30", "--kill-step", "23",
                         "--launchers", "in-process,torchrun")
    inproc, torchrun = rep["launchers"]["in-process"], rep["launchers"]["torchrun"]
    check_split(inproc)
    check_split(torchrun)
    assert inproc["ranks_kept_process"] == 1 and inproc["in_process"] == [True, False], inproc
    assert torchrun["ranks_kept_process"] == 0 and not any(torchrun["in_process"]), torchrun


def gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(gpus() < 2, reason="NCCL recovery needs a GPU per rank, 2 at least")
def test_nccl_ranks_recover_in_process_beside_a_full_restart(tmpdir_shm):
    rep = recovery_bench(tmpdir_shm, "--backend", "nccl", "--ranks", "2", "--steps", "30", "--kill-step", "23",
                         "--launchers", "in-process,in-process-spare,full-restart")
    for name in ("in-process", "in-process-spare", "full-restart"):
        check_split(rep["launchers"][name])
    assert rep["launchers"]["in-process"]["ranks_kept_process"] == 1, rep
    assert rep["launchers"]["in-process-spare"]["in_process"] == [False, True], rep


def test_bad_arguments_are_named(tmpdir_shm):
    import tierckpt.inprocess as ip
    env = dict(os.environ)
    for var in (ip.STORE_FILE_VAR, ip.TORCHRUN_RESTARTS_VAR):
        os.environ.pop(var, None)
    try:
        with pytest.raises(ValueError, match=ip.STORE_FILE_VAR):
            ip.run(lambda rec: None, rank=0, world_size=1)
        with pytest.raises(ValueError, match="max_failures"):
            ip.run(lambda rec: None, rank=0, world_size=1, store=object(), max_failures=-1)
        bad = tmpdir_shm / "generation"
        bad.write_text("seven\n")
        os.environ[ip.GENERATION_FILE_VAR] = str(bad)
        with pytest.raises(ValueError, match=ip.GENERATION_FILE_VAR):
            ip._next_generation(0, 1.0)
        bad.write_text("0\n")
        with pytest.raises(TimeoutError, match="announced no generation after 0"):
            ip._next_generation(0, 0.05)
    finally:
        os.environ.clear()
        os.environ.update(env)
    for argv, what in ((["--launchers", "slurm"], "slurm"), (["--ranks", "1"], "--ranks"),
                       (["--kill-rank", "4"], "--kill-rank"), (["--kill-step", "99"], "--kill-step")):
        r = subprocess.run([sys.executable, "-m", "tierckpt.recovery_bench", *argv], env=py_env(),
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 2 and what in r.stderr, (argv, r.stderr)
