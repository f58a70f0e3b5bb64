"""In-process recovery (`tierckpt.inprocess`): a rank of a 2-rank gloo job is SIGKILLed; the
survivor keeps its process, rebuilds the process group with the replacement and rolls back
from its node's memory; both end bitwise equal to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from conftest import py_env, wait_until

WORKER = Path(__file__).with_name("inprocess_worker.py")
WORLD = 2


def start(rank, tmp, socket, ns, generation, tag):
    env = py_env(RANK=rank, WORLD_SIZE=WORLD, LOCAL_WORLD_SIZE=WORLD, TIERCKPT_SOCKET=socket,
                 TIERCKPT_NAMESPACE=ns, TIERCKPT_STORE_FILE=tmp / f"store-{tag}",
                 TIERCKPT_GENERATION=generation)
    return subprocess.Popen([sys.executable, str(WORKER), "--progress", str(tmp / f"progress-{tag}.{rank}"),
                             "--out", str(tmp / f"out-{tag}.{rank}")], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / f"err-{tag}.{rank}", "w"))


def events(tmp, tag, rank):
    p = tmp / f"progress-{tag}.{rank}"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def run_job(tmp, socket, kill_at=None):
    tag = uuid.uuid4().hex[:8]
    ns = f"inproc-{tag}"
    procs = [start(r, tmp, socket, ns, 0, tag) for r in range(WORLD)]
    try:
        if kill_at is not None:
            wait_until(lambda: any(e.get("step", 0) >= kill_at for e in events(tmp, tag, 1)), what="rank 1 at the kill step")
            procs[1].send_signal(signal.SIGKILL)
            procs[1].wait()
            procs[1] = start(1, tmp, socket, ns, 1, tag)  # the launcher restarts only rank 1
        for r, p in enumerate(procs):
            assert p.wait(timeout=180) == 0, (tmp / f"err-{tag}.{r}").read_text()
        outs = [(tmp / f"out-{tag}.{r}").read_text().strip() for r in range(WORLD)]
        return outs, [events(tmp, tag, r) for r in range(WORLD)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_killed_rank_is_replaced_and_the_survivor_rolls_back_in_its_process(daemon, tmp_path):
    reference, _ = run_job(tmp_path, daemon["socket"])
    outs, ev = run_job(tmp_path, daemon["socket"], kill_at=23)
    assert outs == reference, "bitwise equal to the uninterrupted run"
    survivor = ev[0]
    assert len({e["pid"] for e in survivor}) == 1, "rank 0 kept its process"
    resumes = [e for e in survivor if e["event"] == "resumed"]
    assert [r["generation"] for r in resumes] == [0, 1] and resumes[1]["in_process"], resumes
    assert resumes[1]["step"] == 20, "rolled back to the newest checkpoint every rank holds"
    assert len(resumes[1]["failures"]) == 1 and resumes[1]["failures"][0][2] > 0, resumes[1]
    replacement = [e for e in ev[1] if e["event"] == "resumed"][-1]
    assert (replacement["generation"], replacement["in_process"], replacement["step"]) == (1, False, 20), replacement
    steps = [e["step"] for e in survivor if e["event"] == "step"]
    assert steps.count(21) == 2 and steps[-1] == 60, "steps after the checkpoint were redone"


def test_bad_arguments_are_named():
    import pytest
    import tierckpt.inprocess as ip
    env = dict(os.environ)
    os.environ.pop(ip.STORE_FILE_VAR, None)
    try:
        with pytest.raises(ValueError, match=ip.STORE_FILE_VAR):
            ip.run(lambda rec: None, rank=0, world_size=1)
        with pytest.raises(ValueError, match="max_failures"):
            ip.run(lambda rec: None, rank=0, world_size=1, store=object(), max_failures=-1)
    finally:
        os.environ.clear()
        os.environ.update(env)
