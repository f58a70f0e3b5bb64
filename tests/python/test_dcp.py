"""PyTorch DCP through tierckpt (`tierckpt.torch`) against a real tierckptd: round trips through dcp.save,
dcp.async_save with the stager, and dcp.load; the metadata shard as the commit point; a daemon killed
mid-save; a corrupt shard; resharding 2 -> 1 and 2 -> 4 ranks under torchrun (gloo)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from tierckpt import shard
from tierckpt.errors import TierckptError
from tierckpt.torch import TierckptReader, TierckptStager, TierckptWriter

from conftest import binary, py_env, run_daemon
from dcp_worker import same as assert_same

HERE = pathlib.Path(__file__).resolve().parent
FAILED = (CheckpointException, TierckptError)  # DCP wraps what a rank raised in a BaseException
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def state(seed: int):
    """A model, its Adam state after two steps, odd dtypes and plain values (all change with `seed`)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(),
            "extra": {"bf16": torch.randn(3, 7).to(torch.bfloat16), "i64": torch.randint(-2**40, 2**40, (9,)),
                      "empty": torch.zeros(0, 4), "epoch": seed, "name": f"run-{seed}", "lrs": [0.1, seed / 7]}}


def shard_files(daemon, ns, step=None):
    step_dir = "*" if step is None else f"{step:020}"
    return sorted(pathlib.Path(daemon["dir"]).glob(f"mem/ns/{ns}/{step_dir}/rank-*.safetensors"))


def header_meta(path) -> dict:
    with open(path, "rb") as f:
        return shard.parse_header(f.read())[1]


@pytest.fixture
def daemon():
    yield from run_daemon()


def test_dcp_save_and_load_round_trip_bitwise(daemon):
    saved = state(1)
    dcp.save(saved, checkpoint_id=7, storage_writer=TierckptWriter(namespace="rt", socket=daemon["socket"]))
    target = state(2)
    reader = TierckptReader(namespace="rt", socket=daemon["socket"])
    dcp.load(target, storage_reader=reader)
    assert reader.loaded_step == 7
    assert_same(saved, target)
    # one shard for the data of rank 0, one for the metadata (rank 1 of the daemon's 2)
    files = shard_files(daemon, "rt")
    assert [f.name for f in files] == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    assert header_meta(files[1])["dcp"] == "metadata"


def test_async_save_with_the_stager_seals_the_staged_shard_and_round_trips(daemon):
    writer = TierckptWriter(namespace="as", socket=daemon["socket"])
    stager = TierckptStager(writer)
    saved = state(3)
    expect = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in saved[k].items()}
              for k in ("model", "extra")}
    writer.step = 11
    fut = dcp.async_save(saved, storage_writer=writer, async_stager=stager)
    # the stage is a snapshot: training may change the state at once
    for t in saved["model"].values():
        t.add_(1000)
    saved["extra"]["epoch"] = 99
    (fut.result() if hasattr(fut, "result") else fut.upload_completion.result())
    stager.close()
    target = state(4)
    dcp.load(target, storage_reader=TierckptReader(step=11, namespace="as", socket=daemon["socket"]))
    assert_same(expect["model"], target["model"])
    assert_same(expect["extra"], target["extra"])
    # the data shard is the one the stager filled, sealed without a rewrite
    data = shard_files(daemon, "as")[0]
    assert data.name == "rank-00000-of-00002.safetensors" and header_meta(data)["dcp"] == "staged"


def test_explicit_step_and_latest_committed_by_default(daemon):
    writer = TierckptWriter(namespace="steps", socket=daemon["socket"])
    s1, s2 = state(5), state(6)
    dcp.save(s1, checkpoint_id=1, storage_writer=writer)
    dcp.save(s2, checkpoint_id="tierckpt://steps/2", storage_writer=writer)
    t = state(9)
    dcp.load(t, checkpoint_id=1, storage_reader=TierckptReader(namespace="steps", socket=daemon["socket"]))
    assert_same(s1, t)
    t = state(9)
    dcp.load(t, storage_reader=TierckptReader(namespace="steps", socket=daemon["socket"]))
    assert_same(s2, t)
    with pytest.raises(ValueError, match="not a tierckpt step"):
        dcp.save(s1, checkpoint_id="/some/dir", storage_writer=writer)


class _DiesBeforeMetadata(TierckptWriter):
    def finish(self, metadata, results):
        os.kill(os.getpid(), signal.SIGKILL)


def _save_in_child(sock, ns, step, die):
    code = (f"import sys, torch.distributed.checkpoint as dcp; sys.path.insert(0, {str(HERE)!r}); "
            f"import test_dcp as t; w = (t._DiesBeforeMetadata if {die} else t.TierckptWriter)"
            f"(namespace={ns!r}, socket={sock!r}); dcp.save(t.state({step}), checkpoint_id={step}, storage_writer=w)")
    return subprocess.run([sys.executable, "-c", code], env=py_env(), capture_output=True, text=True, timeout=120)


def test_a_save_killed_before_its_metadata_is_never_loaded(daemon):
    sock = daemon["socket"]
    assert _save_in_child(sock, "kill", 1, False).returncode == 0
    r = _save_in_child(sock, "kill", 2, True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert [f.name for f in shard_files(daemon, "kill", 2)] == ["rank-00000-of-00002.safetensors"], \
        "the killed save should have sealed its data shard and no metadata: the test would prove nothing"
    # the latest committed step is the one before
    t = state(9)
    reader = TierckptReader(namespace="kill", socket=sock)
    dcp.load(t, storage_reader=reader)
    assert reader.loaded_step == 1
    assert_same(state(1), t)
    # asked for by number, the uncommitted step is refused by name
    with pytest.raises(FAILED) as e:
        dcp.load(state(9), storage_reader=TierckptReader(step=2, namespace="kill", socket=sock))
    assert "step 2" in str(e.value) and "no DCP metadata" in str(e.value)


def test_daemon_killed_mid_save_gives_a_clear_error_and_no_visible_step(tmpdir_shm):
    mem = tmpdir_shm / "mem"

    def start():
        p = subprocess.Popen([binary("tierckptd"), "--memory-dir", str(mem), "--memory-tier-size", "256MiB",
                              "--socket", str(tmpdir_shm / "d.sock")], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TIERCKPT_LOG": "warn"})
        assert json.loads(p.stdout.readline())["event"] == "ready"
        return p

    d = start()
    sock = str(tmpdir_shm / "d.sock")
    try:
        dcp.save(state(1), checkpoint_id=1, storage_writer=TierckptWriter(namespace="dk", socket=sock))

        class KillsTheDaemon(TierckptWriter):
            def finish(self, metadata, results):
                d.kill()
                d.wait()
                super().finish(metadata, results)

        with pytest.raises(FAILED) as e:
            dcp.save(state(2), checkpoint_id=2, storage_writer=KillsTheDaemon(namespace="dk", socket=sock))
        assert "daemon" in str(e.value) and sock in str(e.value), str(e.value)
        d = start()
        t = state(9)
        reader = TierckptReader(namespace="dk", socket=sock)
        dcp.load(t, storage_reader=reader)
        assert reader.loaded_step == 1
        assert_same(state(1), t)
        with pytest.raises(FAILED, match="no DCP metadata"):
            dcp.load(state(9), storage_reader=TierckptReader(step=2, namespace="dk", socket=sock))
    finally:
        d.kill()
        d.wait()


def test_a_corrupt_shard_is_never_loaded(daemon):
    saved = {"w": torch.arange(100_000, dtype=torch.float32), "n": 5}
    dcp.save(saved, checkpoint_id=3, storage_writer=TierckptWriter(namespace="flip", socket=daemon["socket"]))
    data = shard_files(daemon, "flip")[0]
    assert data.name == "rank-00000-of-00002.safetensors"
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) - 1000)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    target = {"w": torch.zeros(100_000), "n": 0}
    with pytest.raises(FAILED) as e:
        dcp.load(target, storage_reader=TierckptReader(step=3, namespace="flip", socket=daemon["socket"]))
    msg = str(e.value)
    assert "corrupt" in msg and "rank 0" in msg and "step 3" in msg, msg
    assert torch.count_nonzero(target["w"]) == 0, "corrupt bytes reached the state"


def test_a_tampered_metadata_shard_cannot_run_code():
    import pickle
    from tierckpt.torch import metadata as md_io

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        md_io.loads(pickle.dumps(Evil()))


def torchrun(nproc: int, *args, sock: str, timeout=300):
    """Runs dcp_worker.py on `nproc` gloo ranks against the daemon at `sock`."""
    from conftest import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(HERE / "dcp_worker.py"), *map(str, args)]
    r = subprocess.run(cmd, env=py_env(TIERCKPT_SOCKET=sock), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert r.stdout.count("matches bitwise") == nproc or args[0] == "save", r.stdout
    return r


class Saved:
    """One daemon for a module's torchrun tests, and the steps saved on 2 ranks so far (api, state) -> ref."""

    def __init__(self, daemon, tmp):
        self.daemon, self.tmp, self.refs = daemon, tmp, {}

    def ensure(self, api: str, kind: str):
        """The reference file of step 5 saved on 2 ranks through `api` (saved on first use; a failed save
        fails every test that needs it, with its own error)."""
        if (api, kind) not in self.refs:
            ref = self.tmp / f"ref-{api}-{kind}.pt"
            try:
                torchrun(2, "save", api, kind, 5, ref, sock=self.daemon["socket"])
                self.refs[api, kind] = ref
            except AssertionError as e:
                self.refs[api, kind] = e
        got = self.refs[api, kind]
        if isinstance(got, AssertionError):
            pytest.fail(f"saving step 5 on 2 ranks through {api} failed: {got}")
        return got

    def load(self, nproc: int, api: str, kind: str):
        torchrun(nproc, "load", api, kind, 5, self.ensure(api, kind), sock=self.daemon["socket"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    gen = run_daemon("--keep-last", "50")
    d = next(gen)
    try:
        yield Saved(d, tmp_path_factory.mktemp("refs"))
    finally:
        gen.close()


@pytest.mark.parametrize("nproc", [1, 4])
@pytest.mark.parametrize("api", ["dcp", "async"])
def test_dtensors_saved_on_2_ranks_reshard(saved, api, nproc):
    saved.load(nproc, api, "plain")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_through_the_stager_and_the_writer_round_trips(daemon):
    """CUDA tensors: the stager copies device-to-host on a side stream into the segment, the writer seals after
    the copies; dcp.save copies them itself; dcp.load fills CUDA targets."""
    torch.manual_seed(0)
    saved = {"w": torch.randn(1000, 257, device="cuda"), "h": torch.randn(33, device="cuda").half(),
             "t": torch.randn(64, 64, device="cuda").t(), "cpu": torch.arange(10), "n": 3}
    expect = {k: v.cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
    writer = TierckptWriter(step=1, namespace="cuda", socket=daemon["socket"])
    stager = TierckptStager(writer)
    fut = dcp.async_save(saved, storage_writer=writer, async_stager=stager)
    for k in ("w", "h", "t"):
        saved[k].add_(1)  # ordered after the copy on the device: the stage is a snapshot
    (fut.result() if hasattr(fut, "result") else fut.upload_completion.result())
    stager.close()
    dcp.save(saved, checkpoint_id=2, storage_writer=writer)
    for step, want in ((1, expect), (2, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in saved.items()})):
        target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in saved.items()}
        dcp.load(target, storage_reader=TierckptReader(step=step, namespace="cuda", socket=daemon["socket"]))
        assert target["w"].device.type == "cuda"
        assert_same(want, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in target.items()})
