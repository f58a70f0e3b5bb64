"""A trainer stuck in a collective is a hang: under `tierckpt run --hang-timeout`, two gloo ranks under torchrun,
one of which stops before an all_reduce in the first run, so the other waits in it. Neither calls
`should_save` any more, the heartbeat goes quiet, the supervisor kills torchrun and its workers (which torchrun
starts in sessions of their own) and restarts the job, and the second run finishes."""

import subprocess
import sys
import textwrap

from tierckpt import Client

from conftest import binary, free_port, kill_tree, py_env

WORKER = textwrap.dedent("""
    import os, time
    import torch, torch.distributed as dist
    from tierckpt import Checkpointer
    dist.init_process_group("gloo")
    rank, first_run = dist.get_rank(), os.environ["TIERCKPT_RESTART"] == "0"
    cp = Checkpointer()
    x = torch.ones(4)
    for step in range(20):
        cp.should_save(step)
        if first_run and rank == 1 and step == 5:
            time.sleep(3600)  # stuck before the collective: rank 0 waits in all_reduce
        dist.all_reduce(x)
        time.sleep(0.05)
    print(f"rank {rank}: finished run {os.environ['TIERCKPT_RESTART']}", flush=True)
    dist.destroy_process_group()
""")


def test_a_rank_stuck_in_a_collective_is_a_hang_and_the_job_restarts(daemon, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--max-restarts", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                str(script)]
    proc = subprocess.Popen([binary("tierckpt"), "run", "--max-restarts", "1", "--backoff", "100ms",
                             "--hang-timeout", "8s", "--namespace", "stuck", "--socket", daemon["socket"], "--",
                             *torchrun], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=py_env())
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, out
    assert "rank 0: finished run 1" in out and "rank 1: finished run 1" in out, out
    assert "finished run 0" not in out, out
    kinds = [r["kind"] for r in Client(daemon["socket"]).failures("stuck")]
    assert kinds == ["start", "hang"], kinds
