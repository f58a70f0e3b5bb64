"""The job declares a step complete (completion.py): ranks on nodes that each hold only their own
shard agree which step every rank holds visible, and each node's retention follows at once, where
it would otherwise wait for the cluster view (here: no cluster at all, so it would never know)."""

import subprocess
import sys

import pytest

from tierckpt import Client

from conftest import free_port, py_env, run_daemon

JOB = r"""
import sys, torch, torch.distributed as dist
from tierckpt import Checkpointer, completion
completion.ASK_EVERY_S = 0.0  # each round asks the daemon what is visible: no round goes by on an old answer
dist.init_process_group("gloo")
rank = dist.get_rank()
sock, async_save = sys.argv[1 + rank], sys.argv[3] == "async"
ck = Checkpointer({"socket": sock, "namespace": "settle", "checkpoint_frequency": 1, "async_save": async_save},
                  rank=rank, world_size=2)
for step in range(1, 9):
    if ck.should_save(step):
        ck.save(step, {"w": torch.full((1024,), float(step + rank))})
ck.wait()
for step in range(9, 12):  # two more rounds, as training goes on, declare the last step too
    ck.should_save(step)
ck.close()
dist.destroy_process_group()
"""


DCP_JOB = r"""
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from tierckpt.torch import TierckptWriter
dist.init_process_group("gloo")
rank = dist.get_rank()
writer = TierckptWriter(namespace="dcp-settle", socket=sys.argv[1 + rank])
for step in range(1, 5):
    dcp.save({f"w{rank}": torch.full((256,), float(10 * step + rank))}, checkpoint_id=step, storage_writer=writer)
writer.close()
dist.destroy_process_group()
"""


def torchrun(tmp_path, job, *args):
    script = tmp_path / "job.py"
    script.write_text(job)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                        str(script), *args], capture_output=True, text=True, timeout=300, env=py_env())
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def two_daemons():
    first, second = run_daemon("--keep-last", "1"), run_daemon("--keep-last", "1")
    try:
        yield next(first), next(second)
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ranks_on_separate_nodes_declare_their_steps_complete_and_retention_follows(two_daemons, tmp_path, mode):
    sockets = [d["socket"] for d in two_daemons]
    torchrun(tmp_path, JOB, *sockets, mode)
    # Each node holds one rank of a two-rank job: no step is complete there by itself, and without
    # the declarations keep_last 1 would keep all 8.
    for rank, sock in enumerate(sockets):
        steps = Client(sock).list_steps("settle")
        assert [(s["step"], s["ranks"], s["complete"]) for s in steps] == [(8, [rank], False)], steps


def test_a_step_one_rank_lacks_is_never_declared(two_daemons, monkeypatch):
    from tierckpt import Checkpointer, completion
    monkeypatch.setattr(completion, "ASK_EVERY_S", 0.0)
    ranks = [Checkpointer({"socket": d["socket"], "namespace": "hole", "async_save": False}, rank=r, world_size=2)
             for r, d in enumerate(two_daemons)]

    def agree():  # one round, the all-reduce (max) done by hand
        local = [ck._completion.local(ck) for ck in ranks]
        reduced = [max(v[i] for v in local) for i in range(len(local[0]))]
        for ck in ranks:
            ck._completion.agreed(ck, reduced)

    def held():
        return [[s["step"] for s in Client(d["socket"]).list_steps("hole")] for d in two_daemons]

    for step in (1, 2):
        ranks[0].save(step, {"w": [float(step)]})
    for step in (1, 3):  # rank 1's save of step 2 was lost
        ranks[1].save(step, {"w": [float(step)]})
    agree()
    agree()
    assert [ck._completion.candidate for ck in ranks] == [2, 2], "the smallest newest step"
    assert held() == [[1, 2], [1, 3]], "step 2, which rank 1 lacks, is not declared"
    ranks[0].save(3, {"w": [3.0]})
    agree()
    agree()
    assert held() == [[3], [3]], "step 3 is on every rank: declared, and keep_last 1 follows"
    # A rollback: step 6, declared, is discarded; steps 4 and 5 come again and are declared in turn.
    for step in (6, 4, 5):
        for ck in ranks:
            ck.save(step, {"w": [float(step)]})
        agree()
        agree()
        if step == 6:
            assert held() == [[6], [6]]
            for d in two_daemons:
                Client(d["socket"]).delete_step("hole", 6)
    assert held() == [[5], [5]]
    for ck in ranks:
        ck.close()


def test_dcp_saves_are_declared_complete_by_the_coordinator_and_in_the_next_plans(two_daemons, tmp_path):
    torchrun(tmp_path, DCP_JOB, *[d["socket"] for d in two_daemons])
    # A DCP step has 3 shards here: rank 0 and the metadata (rank 2) on node 0, rank 1 on node 1.
    held = [[(s["step"], s["ranks"]) for s in Client(d["socket"]).list_steps("dcp-settle")] for d in two_daemons]
    assert held[0] == [(4, [0, 2])], "the coordinator declares each step it commits: keep_last 1 keeps the last"
    assert held[1] == [(3, [1]), (4, [1])], "rank 1 learns of step 3 in step 4's plan, of step 4 at the next save"
