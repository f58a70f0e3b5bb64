"""The unchanged `amzn-sagemaker-checkpointing` package (PyPI) against tierckptd's HyperPod API: its DCP
`SageMakerTieredStorageWriter` and `SageMakerTieredStorageReader` under torchrun on 1 and 2 gloo ranks (CPU),
no S3 tier. Saved state comes back bitwise, what it wrote is listed by `tierckpt ls`, and a daemon killed
mid-save gives the client a clear exception and leaves no visible partial step."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
import requests

from conftest import binary, free_port, py_env, tierckpt, wait_until

pytest.importorskip("torch")
pytest.importorskip("amzn_sagemaker_checkpointing")

# One worker per rank. Pointing the client at a daemon is the one thing a user sets up: the package builds its
# InMemoryCheckpointClient itself, so its base URL is given as the package's own integration tests give it.
WORKER = textwrap.dedent(r'''
    import json, os, pathlib, sys, time
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from amzn_sagemaker_checkpointing.config.in_memory_client import InMemoryClientConfig
    from amzn_sagemaker_checkpointing.config.sagemaker_checkpoint_config import SageMakerCheckpointConfig
    from amzn_sagemaker_checkpointing.checkpointing.filesystem.writer import SageMakerTieredStorageWriter
    from amzn_sagemaker_checkpointing.checkpointing.filesystem.reader import SageMakerTieredStorageReader
    from amzn_sagemaker_checkpointing.storage.clients.inmemory import inmemory_client

    _init = inmemory_client.InMemoryCheckpointClient.__init__

    def _at_daemon(self, *args, config=None, **kwargs):
        config = config or InMemoryClientConfig(base_url=os.environ["HP_URL"], request_timeout=30.0)
        _init(self, *args, config=config, **kwargs)

    inmemory_client.InMemoryCheckpointClient.__init__ = _at_daemon

    class PausingWriter(SageMakerTieredStorageWriter):
        """Stops before DCP's metadata (the commit point) until the test says go: the daemon dies there."""
        def finish(self, metadata, results):
            pause = os.environ.get("HP_PAUSE_DIR")
            if pause:
                pathlib.Path(pause, "paused").touch()
                while not pathlib.Path(pause, "go").exists():
                    time.sleep(0.02)
            return super().finish(metadata, results)

    def state(rank, step):
        shared = torch.Generator().manual_seed(step)
        own = torch.Generator().manual_seed(1000 * step + rank)
        return {
            "model": {"w": torch.randn(64, 32, generator=shared),
                      "b": torch.randn(32, generator=shared).to(torch.bfloat16)},
            f"rank{rank}": {"x": torch.randn(3000, generator=own),
                            "i": torch.randint(0, 1 << 40, (50,), generator=own, dtype=torch.int64)},
            "extra": {"step": step, "note": f"step {step}"},
        }

    def template(rank):
        s = state(rank, 0)
        for group in ("model", f"rank{rank}"):
            s[group] = {k: torch.zeros_like(v) for k, v in s[group].items()}
        s["extra"] = {"step": -1, "note": ""}
        return s

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, torch.Tensor):
            return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                              b.view(-1).view(torch.uint8))
        return a == b

    def main():
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        cfg = SageMakerCheckpointConfig(namespace=os.environ["HP_NAMESPACE"], world_size=world)
        what, steps = sys.argv[1], [int(s) for s in sys.argv[2:]]
        try:
            if what == "save":
                for step in steps:
                    dcp.save(state(rank, step), storage_writer=PausingWriter(cfg, step=step))
                out = {"saved": steps}
            else:
                expected, step = steps[0], (steps[1] if len(steps) > 1 else None)
                loaded = template(rank)
                dcp.load(loaded, storage_reader=SageMakerTieredStorageReader(cfg, step=step))
                out = {"loaded": expected, "bitwise": same(loaded, state(rank, expected))}
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            out = {"error": f"{type(e).__name__}: {e}"}
        # One file per rank: lines printed by two ranks may interleave.
        pathlib.Path(os.environ["HP_OUT"], f"rank{rank}.json").write_text(json.dumps({"rank": rank, **out}))
        dist.destroy_process_group()

    main()
''')


class Daemon:
    """A tierckptd with its HyperPod API on a loopback port, restartable on the same memory directory."""

    def __init__(self):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="tierckpt-hp-", dir=base)
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [binary("tierckptd"), "--memory-dir", f"{self.dir}/mem", "--memory-tier-size", "256MiB",
             "--hyperpod-listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "TIERCKPT_LOG": "warn"})
        ready = json.loads(self.proc.stdout.readline())
        assert ready["event"] == "ready", ready
        self.socket, self.url = ready["socket"], f"http://{ready['hyperpod_addr']}"

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def hp_daemon():
    d = Daemon()
    try:
        yield d
    finally:
        d.close()


def torchrun(tmp_path, d, ns, ranks, *args, pause_dir=None, background=False):
    script = tmp_path / "hp_worker.py"
    script.write_text(WORKER)
    out = tmp_path / "results"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(script),
           *[str(a) for a in args]]
    env = py_env(HP_URL=d.url, HP_NAMESPACE=ns, HP_OUT=out)
    if pause_dir:
        env["HP_PAUSE_DIR"] = str(pause_dir)
    if background:
        with open(tmp_path / "worker.log", "w") as log:  # a file: a full pipe would stall the workers
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return results(out, r.stdout + r.stderr)


def results(out, log=""):
    """rank -> what the worker of that rank reported."""
    found = {json.loads(f.read_text())["rank"]: json.loads(f.read_text()) for f in out.glob("rank*.json")}
    assert found, f"no worker reported:\n{log}"
    return found


@pytest.mark.parametrize("ranks", [1, 2])
def test_dcp_save_and_load_through_the_hyperpod_client_bitwise(hp_daemon, tmp_path, ranks):
    ns = f"hp-{ranks}"
    saved = torchrun(tmp_path, hp_daemon, ns, ranks, "save", 10, 20)
    assert all(saved[r].get("saved") == [10, 20] for r in range(ranks)), saved
    # Native shards: the DCP ranks and the metadata rank, in every step, listed by the CLI.
    ls = tierckpt(hp_daemon.socket, "ls", ns, "--json")
    assert ls.returncode == 0, ls.stderr
    steps = {s["step"]: s for s in json.loads(ls.stdout)["steps"]}
    assert sorted(steps) == [10, 20], ls.stdout
    assert all(s["complete"] and s["world_size"] == ranks + 1 for s in steps.values()), ls.stdout

    latest = torchrun(tmp_path, hp_daemon, ns, ranks, "load", 20)
    assert all(latest[r].get("bitwise") is True for r in range(ranks)), latest
    older = torchrun(tmp_path, hp_daemon, ns, ranks, "load", 10, 10)
    assert all(older[r].get("bitwise") is True for r in range(ranks)), older


def test_daemon_killed_mid_save_gives_a_clear_exception_and_no_partial_step(hp_daemon, tmp_path):
    ns = "hp-kill"
    saved = torchrun(tmp_path, hp_daemon, ns, 1, "save", 10)
    assert saved[0].get("saved") == [10], saved
    pause = tmp_path / "pause"
    pause.mkdir()
    # Step 20: the rank's data is stored, then the daemon dies before DCP's metadata is written.
    p = torchrun(tmp_path, hp_daemon, ns, 1, "save", 20, pause_dir=pause, background=True)
    try:
        wait_until(lambda: (pause / "paused").exists() or p.poll() is not None, timeout=240, what="the save paused")
        assert (pause / "paused").exists(), (tmp_path / "worker.log").read_text()
        hp_daemon.kill()
        (pause / "go").touch()
        p.wait(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log = (tmp_path / "worker.log").read_text()
    err = results(tmp_path / "results", log)[0].get("error", "")
    assert "SageMakerInMemoryTierError" in err and "metadata failed saving in-memory" in err, log

    hp_daemon.start()
    latest = requests.get(f"{hp_daemon.url}/v1/cp/checkpoints/{ns}/latest", timeout=30)
    assert latest.status_code == 200 and latest.json() == [10], latest.text
    ls = json.loads(tierckpt(hp_daemon.socket, "ls", ns, "--json").stdout)
    partial = [s for s in ls["steps"] if s["step"] == 20]
    assert all(not s["complete"] for s in partial), ls
    loaded = torchrun(tmp_path, hp_daemon, ns, 1, "load", 10)
    assert loaded[0].get("bitwise") is True, loaded


def test_a_corrupt_shard_is_never_loaded(hp_daemon, tmp_path):
    ns = "hp-flip"
    assert torchrun(tmp_path, hp_daemon, ns, 1, "save", 10)[0].get("saved") == [10]
    data = os.path.join(hp_daemon.dir, "mem", "ns", ns, f"{10:020}", "rank-00000-of-00002.safetensors")
    with open(data, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        b = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x20]))
    loaded = torchrun(tmp_path, hp_daemon, ns, 1, "load", 10, 10)
    assert "SageMakerInMemoryTierError" in loaded[0].get("error", "") and "In-memory read failed" in loaded[0]["error"]
    import requests

    r = requests.get(f"{hp_daemon.url}/v1/cp/checkpoints/{ns}/0/10", timeout=30)
    assert r.status_code == 422 and "checksum" in r.json()["message"], r.text
