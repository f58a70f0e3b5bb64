"""`TierckptCheckpointIO` with real Lightning Trainers on the CPU against a real tierckptd."""

import collections
import copy
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import tierckpt  # noqa: E402
from tierckpt import Client, CorruptError, TierckptError  # noqa: E402
from tierckpt.lightning import TierckptCheckpointIO  # noqa: E402

from conftest import binary, py_env, run_daemon, wait_until  # noqa: E402
from test_checkpointer import assert_same  # noqa: E402


@pytest.fixture
def daemon():
    yield from run_daemon("--keep-last", "50")


class Tiny(L.LightningModule):
    """Two linear layers, Adam and a step scheduler: weights, optimizer state and loops to restore."""

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def training_step(self, batch, _i):
        x, y = batch
        self.log("gstep", float(self.global_step))  # for top-k: the newest are the best
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)]

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)),
                          batch_size=8)


class Extra(L.Callback):
    """A callback whose state holds values the shard's JSON tree cannot (a set, a Counter)."""

    def __init__(self, value=None):
        self.value = value if value is not None else {"seen": {1, 2, 3}, "counts": collections.Counter(a=2)}
        self.loaded = None

    def state_dict(self):
        return {"value": self.value, "n": 7}

    def load_state_dict(self, state):
        self.loaded = state


class Recording(TierckptCheckpointIO):
    """Keeps a deep copy of each checkpoint Lightning asked it to save, by path."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.saved = {}

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saved[os.path.abspath(path)] = copy.deepcopy(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)


class StateAtStart(L.Callback):
    """The model's weights and the optimizer's state when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        self.weights = copy.deepcopy(pl_module.state_dict())
        self.optim = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.global_step = trainer.global_step


def trainer(io, tmp, max_steps, callbacks=(), **mc):
    mc = {"dirpath": str(tmp), "every_n_train_steps": 2, "save_top_k": -1, **mc}
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, plugins=[io], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=[ModelCheckpoint(**mc), *callbacks])


def io_for(daemon, ns="lit", cls=TierckptCheckpointIO, **cfg):
    return cls({"socket": daemon["socket"], "namespace": ns, **cfg})


def steps(daemon, ns):
    return sorted(s["step"] for s in Client(daemon["socket"]).list_steps(ns))


def pointers(tmp):
    return {p.name: json.loads(p.read_text()) for p in sorted(pathlib.Path(tmp).glob("*.ckpt")) if not p.is_symlink()}


@pytest.mark.parametrize("async_save", [True, False])
def test_fit_saves_to_the_daemon_and_resumes_bitwise(daemon, tmp_path, async_save):
    torch.manual_seed(0)
    io = io_for(daemon, cls=Recording, async_save=async_save)
    trainer(io, tmp_path, 6, callbacks=[Extra()]).fit(Tiny())
    ptrs = pointers(tmp_path)
    assert sorted(ptrs) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt"]
    assert sorted(ptrs) == sorted(os.path.basename(p) for p in io.saved)
    assert steps(daemon, "lit") == sorted(p["step"] for p in ptrs.values())
    assert all(p["format"] == "tierckpt-lightning/1" and p["namespace"] == "lit" for p in ptrs.values())

    # every checkpoint loads back equal to what Lightning handed over, types included
    for path, saved in io.saved.items():
        loaded = io.load_checkpoint(path)
        assert_same(saved, loaded)

    # a new Trainer and model resume from the middle checkpoint: weights and optimizer state as saved
    path = str(tmp_path / "epoch=0-step=4.ckpt")
    saved = io.saved[path]
    torch.manual_seed(1)
    at_start, extra = StateAtStart(), Extra(value="other")
    t2 = trainer(io_for(daemon, async_save=async_save), tmp_path / "2", 8, callbacks=[at_start, extra])
    t2.fit(Tiny(), ckpt_path=path)
    assert at_start.global_step == 4
    assert_same(saved["state_dict"], at_start.weights)
    assert_same(saved["optimizer_states"][0], at_start.optim)
    assert extra.loaded == {"value": {"seen": {1, 2, 3}, "counts": collections.Counter(a=2)}, "n": 7}
    assert t2.global_step == 8


def test_ckpt_path_last_resumes_from_the_newest_last_checkpoint(daemon, tmp_path):
    io = io_for(daemon, cls=Recording)
    trainer(io, tmp_path, 6, save_last=True, save_top_k=1).fit(Tiny())
    last = str(tmp_path / "last.ckpt")
    assert os.path.isfile(last) and not os.path.islink(last)
    saved = io.saved[last]
    assert saved["global_step"] == 6
    # save_top_k=1: the older top-k files were removed, and so were their steps
    ptrs = pointers(tmp_path)
    assert sorted(ptrs) == ["epoch=1-step=6.ckpt", "last.ckpt"]
    assert steps(daemon, "lit") == sorted(p["step"] for p in ptrs.values())

    at_start = StateAtStart()
    t2 = trainer(io_for(daemon), tmp_path, 10, callbacks=[at_start], save_last=True, save_top_k=1)
    t2.fit(Tiny(), ckpt_path="last")
    assert at_start.global_step == 6
    assert_same(saved["state_dict"], at_start.weights)
    assert_same(saved["optimizer_states"][0], at_start.optim)
    assert t2.global_step == 10
    assert io_for(daemon).load_checkpoint(last)["global_step"] == 10


def test_save_last_link_removes_only_what_no_file_names(daemon, tmp_path):
    io = io_for(daemon)
    trainer(io, tmp_path, 6, save_last="link", save_top_k=2, monitor="gstep", mode="max").fit(Tiny())
    link = tmp_path / "last.ckpt"
    assert link.is_symlink() and os.readlink(link) == "epoch=1-step=6.ckpt"
    ptrs = pointers(tmp_path)
    assert sorted(ptrs) == ["epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt"]
    assert steps(daemon, "lit") == sorted(p["step"] for p in ptrs.values())
    assert io.load_checkpoint(str(link))["global_step"] == 6
    io.remove_checkpoint(str(link))  # the link only: its target keeps its step
    io.wait()
    assert not link.exists() and steps(daemon, "lit") == sorted(p["step"] for p in ptrs.values())


def test_remove_checkpoint_deletes_the_step_from_the_daemon(daemon, tmp_path):
    io = io_for(daemon)
    trainer(io, tmp_path, 4).fit(Tiny())
    ptrs = pointers(tmp_path)
    assert len(ptrs) == 2
    gone = ptrs["epoch=0-step=2.ckpt"]["step"]
    kept = ptrs["epoch=0-step=4.ckpt"]["step"]
    io.remove_checkpoint(str(tmp_path / "epoch=0-step=2.ckpt"))
    io.teardown()
    # picklable with its connections open (ddp_spawn sends the plugin to its children): they stay behind
    io.checkpointer
    clone = pickle.loads(pickle.dumps(io))
    assert clone._ckpt is None and clone.namespace == "lit" and clone.config == io.config
    io.teardown()
    assert not (tmp_path / "epoch=0-step=2.ckpt").exists()
    assert steps(daemon, "lit") == [kept] and gone != kept
    with pytest.raises(FileNotFoundError, match="epoch=0-step=2.ckpt"):
        io.load_checkpoint(str(tmp_path / "epoch=0-step=2.ckpt"))
    # a pointer whose step is gone says so
    (tmp_path / "stale.ckpt").write_text(json.dumps({**ptrs["epoch=0-step=2.ckpt"]}))
    with pytest.raises(tierckpt.NotFoundError, match=r"stale\.ckpt names step .* no longer has"):
        io.load_checkpoint(str(tmp_path / "stale.ckpt"))


def test_steps_continue_after_the_daemons_and_skip_one_another_writer_holds(daemon, tmp_path):
    c = Client(daemon["socket"])
    c.reserve("lit", 7, 0, 1, 64)  # an incomplete step 7 of someone else, held open
    io = io_for(daemon, async_save=False)
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, str(tmp_path / "a.ckpt"))
    assert json.loads((tmp_path / "a.ckpt").read_text())["step"] == 8
    c.reserve("lit", 9, 0, 1, 64)
    io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, str(tmp_path / "b.ckpt"))
    assert json.loads((tmp_path / "b.ckpt").read_text())["step"] == 10
    assert torch.equal(io.load_checkpoint(str(tmp_path / "b.ckpt"))["w"], torch.zeros(3))
    io.teardown()
    c.close()


def test_a_corrupt_shard_is_never_loaded(daemon, tmp_path):
    torch.manual_seed(0)
    io = io_for(daemon)
    trainer(io, tmp_path, 2).fit(Tiny())
    path = tmp_path / "epoch=0-step=2.ckpt"
    step = json.loads(path.read_text())["step"]
    (shard,) = pathlib.Path(daemon["dir"]).glob(f"mem/ns/lit/*{step}/rank-00000-of-00001.safetensors")
    data = bytearray(shard.read_bytes())
    data[len(data) - 40] ^= 0x01  # a bit of the last tensor
    shard.write_bytes(bytes(data))

    torch.manual_seed(1)
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CorruptError, match=r"epoch=0-step=2\.ckpt .*chunk"):
        trainer(io_for(daemon), tmp_path / "2", 4).fit(model, ckpt_path=str(path))
    assert_same(before, model.state_dict())


def test_a_value_that_would_not_load_safely_is_refused_at_save_naming_its_path(daemon, tmp_path):
    io = io_for(daemon, async_save=False)
    with pytest.raises(TypeError, match=r"checkpoint\['callbacks'\]\['x'\]\['s'\]: .*slice.*weights_only"):
        io.save_checkpoint({"callbacks": {"x": {"s": slice(1, 2)}}, "global_step": 1}, str(tmp_path / "a.ckpt"))
    assert not (tmp_path / "a.ckpt").exists() and steps(daemon, "lit") == []
    ok = TierckptCheckpointIO({"socket": daemon["socket"], "namespace": "lit"}, safe_globals=[slice])
    from lightning.fabric.utilities.data import AttributeDict
    state = {"callbacks": {"x": {"s": slice(1, 2)}}, "t": (1, [slice(0, 3)]),
             "hyper_parameters": AttributeDict(lr=0.1, inner=AttributeDict(w=torch.ones(2))),
             "np": [np.float32(1.5), np.int64(-3), np.arange(3, dtype=np.uint16), np.float64("nan")],
             "raw": [b"\x00\xff", bytearray(b"ab")]}
    ok.save_checkpoint(state, str(tmp_path / "b.ckpt"))
    ok.wait()
    assert_same(state, ok.load_checkpoint(str(tmp_path / "b.ckpt")))
    # without the class allowed, the load refuses it too (the shard's bytes are fine)
    with pytest.raises(TierckptError, match=r"checkpoint\['callbacks'\]\['x'\]\['s'\] does not load"):
        io.load_checkpoint(str(tmp_path / "b.ckpt"))
    ok.teardown()


def test_a_torch_saved_checkpoint_still_loads(daemon, tmp_path):
    """A job that switches to the plugin can resume from a checkpoint Lightning wrote as a file."""
    t = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)
    t.fit(Tiny())
    t.save_checkpoint(tmp_path / "plain.ckpt")
    at_start = StateAtStart()
    trainer(io_for(daemon), tmp_path / "2", 4, callbacks=[at_start]).fit(Tiny(), ckpt_path=tmp_path / "plain.ckpt")
    assert at_start.global_step == 2


def start_daemon(base, *extra):
    proc = subprocess.Popen([binary("tierckptd"), "--memory-dir", f"{base}/mem", "--memory-tier-size", "64MiB",
                             "--keep-last", "50", *extra],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "TIERCKPT_LOG": "warn"})
    ready = json.loads(proc.stdout.readline())
    assert ready["event"] == "ready", ready
    return proc, ready["socket"]


def test_a_daemon_killed_mid_save_is_a_clear_error_and_leaves_no_partial_step(tmpdir_shm, monkeypatch):
    from tierckpt import shard

    proc, sock = start_daemon(tmpdir_shm)
    d2 = None
    try:
        real, calls = shard.write, []

        def write_then_kill(buf, header, tensors):
            real(buf, header, tensors)
            calls.append(1)
            if len(calls) == 2:  # the second checkpoint: reserved and written, not sealed
                wait_until(lambda: (ckdir / "epoch=0-step=2.ckpt").exists(), what="the first checkpoint visible")
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        ckdir = tmpdir_shm / "ckpt"
        monkeypatch.setattr(shard, "write", write_then_kill)
        real_write = TierckptCheckpointIO._write

        def slow_pointer(self, path, pointer):  # the next save meets the dead daemon before this thread
            time.sleep(0.5)
            real_write(self, path, pointer)
        monkeypatch.setattr(TierckptCheckpointIO, "_write", slow_pointer)
        io = TierckptCheckpointIO({"socket": sock, "namespace": "lit"})
        with pytest.raises(tierckpt.UnavailableError, match=r"epoch=0-step=4\.ckpt .*was not saved") as e:
            trainer(io, ckdir, 8).fit(Tiny())
        assert re.search(r"and after it: saving checkpoint .*epoch=1-step=6\.ckpt .*failed", str(e.value)), e.value
        monkeypatch.undo()
        assert sorted(p.name for p in ckdir.glob("*.ckpt")) == ["epoch=0-step=2.ckpt"]

        d2, sock = start_daemon(tmpdir_shm)  # the same memory directory
        first = json.loads((ckdir / "epoch=0-step=2.ckpt").read_text())["step"]
        c = Client(sock)
        wait_until(lambda: c.latest("lit") is not None, what="the recovered step")
        assert [s["step"] for s in c.list_steps("lit")] == [first]
        at_start = StateAtStart()
        trainer(TierckptCheckpointIO({"socket": sock, "namespace": "lit"}), ckdir, 4,
                callbacks=[at_start]).fit(Tiny(), ckpt_path=str(ckdir / "epoch=0-step=2.ckpt"))
        assert at_start.global_step == 2
    finally:
        for p in (proc, d2):
            if p is not None:
                p.kill()
                p.wait()


def test_a_checkpoint_only_the_persistent_tier_holds_is_restored_from_there(tmpdir_shm):
    """A node whose memory was lost (a new daemon, an empty memory directory) resumes through the
    pointer file from the step its daemon drained to the persistent tier."""
    store = ("--persistent-path", f"file://{tmpdir_shm}/store", "--persist-every", "1")
    proc, sock = start_daemon(tmpdir_shm, *store)
    d2 = None
    try:
        rec = Recording({"socket": sock, "namespace": "lit"})
        trainer(rec, tmpdir_shm / "ckpt", 2).fit(Tiny())
        path = str(tmpdir_shm / "ckpt" / "epoch=0-step=2.ckpt")
        step = json.loads(pathlib.Path(path).read_text())["step"]
        c = Client(sock)

        def committed():
            for ns in (c.status().get("persistent") or {}).get("namespaces", []):
                if ns.get("namespace") == "lit" and (ns.get("last_committed") or -1) >= step:
                    return True
        wait_until(committed, timeout=60, what="the step drained to the persistent tier")
        c.close()
        proc.kill()
        proc.wait()
        shutil.rmtree(tmpdir_shm / "mem")
        d2, sock = start_daemon(tmpdir_shm, *store)
        at_start = StateAtStart()
        trainer(TierckptCheckpointIO({"socket": sock, "namespace": "lit"}), tmpdir_shm / "ckpt2", 4,
                callbacks=[at_start]).fit(Tiny(), ckpt_path=path)
        assert at_start.global_step == 2
        assert_same(rec.saved[path]["state_dict"], at_start.weights)
        assert_same(rec.saved[path]["optimizer_states"][0], at_start.optim)
    finally:
        for p in (proc, d2):
            if p is not None:
                p.kill()
                p.wait()


DDP_SCRIPT = """
import copy, faulthandler, hashlib, os, sys, torch
faulthandler.dump_traceback_later(100, exit=True)  # a hung rank shows where it hangs
import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
sys.path.insert(0, {tests!r})
from test_lightning import Tiny
from tierckpt.lightning import TierckptCheckpointIO

out, sock = sys.argv[1], sys.argv[2]

def digest(sd):
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode()); h.update(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

class Saved(TierckptCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        name = f"saved-{{checkpoint['global_step']}}-{{os.path.basename(path)}}"
        with open(os.path.join(out, name), "w") as f:
            f.write(digest(checkpoint["state_dict"]) + " " + digest(checkpoint["optimizer_states"][0]["state"][0]))
        super().save_checkpoint(checkpoint, path, storage_options)

class AtStart(L.Callback):
    def on_train_start(self, trainer, m):
        with open(os.path.join(out, f"start-rank{{trainer.global_rank}}"), "w") as f:
            f.write(digest(m.state_dict()) + " " + digest(trainer.optimizers[0].state_dict()["state"][0])
                    + " " + str(trainer.global_step))

def fit(max_steps, ckpt_path, cbs=()):
    t = L.Trainer(max_steps=max_steps, strategy="ddp", accelerator="cpu", devices=2, logger=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  plugins=[Saved({{"socket": sock, "namespace": "ddp"}})],
                  callbacks=[ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=2,
                                             save_last=True, save_top_k=1), *cbs])
    t.fit(Tiny(), ckpt_path=ckpt_path)

fit(4, None)
fit(6, "last", [AtStart()])
"""


def test_ddp_two_ranks_on_gloo_save_on_rank_0_and_both_resume_from_last(daemon, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(pathlib.Path(__file__).parent)))
    r = subprocess.run([sys.executable, str(script), str(tmp_path), daemon["socket"]], capture_output=True,
                       text=True, timeout=120, env=py_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert (tmp_path / "saved-6-last.ckpt").exists(), sorted(os.listdir(tmp_path))  # the resumed run saved
    want = (tmp_path / "saved-4-last.ckpt").read_text().split()
    for rank in (0, 1):
        got = (tmp_path / f"start-rank{rank}").read_text().split()
        assert got == want + ["4"], (rank, got, want)
