"""The Checkpointer with CUDA tensors: registered segments, side-stream copies sealed in the background,
the optimizer hook, verified host-to-device restores. Runs wherever torch sees a CUDA device; skipped
elsewhere (scripts/gpu-check.sh runs these on a GPU machine)."""

import json
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

from tierckpt import Checkpointer, CorruptError, TierckptError, checkpointer, cuda as tcuda

from conftest import binary
from test_checkpointer import assert_same, bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available here (torch.cuda.is_available() is False)")
MiB = 1 << 20


def ckpt(daemon, ns, **cfg):
    return Checkpointer({"socket": daemon["socket"], "namespace": ns, "checkpoint_frequency": 1, **cfg},
                        rank=0, world_size=1)


def devices():
    return [torch.device("cuda", i) for i in range(min(2, torch.cuda.device_count()))]


def mixed_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {"cpu": {"w": torch.randn(1000, generator=g), "step": 7}}
    for d in devices():
        full = torch.randn(512, 768, generator=g)
        state[str(d)] = {
            "f32": full.to(d),
            "bf16": full.to(torch.bfloat16).to(d),
            "t": full.to(d).t(),                      # non-contiguous
            "strided": full.to(d)[::3, 1::2],
            "e4m3": full.to(torch.float8_e4m3fn).to(d),
            "e5m2": full.to(torch.float8_e5m2).to(d),
            "scalar": torch.tensor(3.5, device=d),
            "empty": torch.empty(0, 4, device=d),
            "big": torch.randn(8 * MiB, generator=g).to(d),  # 32 MiB: several chunks
        }
    return state


def on_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: on_cpu(v) for k, v in x.items()}
    return x


class Registrations:
    """Counts cudaHostRegister/Unregister calls made by tierckpt (ptr -> size of the live ones)."""

    def __init__(self, monkeypatch):
        self.live, self.registered = {}, 0
        real_reg, real_unreg = tcuda.register, tcuda.unregister

        def reg(ptr, size, read_only=False, what=""):
            ok = real_reg(ptr, size, read_only, what)
            if ok:
                self.live[ptr] = size
                self.registered += 1
            return ok

        def unreg(ptr, what=""):
            self.live.pop(ptr, None)
            real_unreg(ptr, what)

        monkeypatch.setattr(tcuda, "register", reg)
        monkeypatch.setattr(tcuda, "unregister", unreg)


def test_cuda_mixed_devices_dtypes_and_layouts_round_trip_bitwise(daemon, monkeypatch):
    regs = Registrations(monkeypatch)
    state = mixed_state()
    c = ckpt(daemon, "cudart")
    c.save(1, state)
    c.wait()
    assert regs.registered >= 1 and all(s.registered for s in c._maps.values())
    # in place into CUDA tensors (one non-contiguous), the rest new CPU tensors
    d0 = devices()[0]
    target = {str(d0): {"f32": torch.zeros(512, 768, device=d0),
                        "t": torch.zeros(512, 768, device=d0).t(),
                        "e4m3": torch.zeros(512, 768, device=d0).to(torch.float8_e4m3fn)}}
    back = c.load(target, step=1)
    for k in ("f32", "t", "e4m3"):
        assert back[str(d0)][k] is target[str(d0)][k]
        assert back[str(d0)][k].device == d0
    assert_same(on_cpu(back), on_cpu(state))
    assert not regs.live or set(regs.live) <= {s.tensor().data_ptr() for s in c._maps.values()}
    c.close()
    assert regs.live == {}, "segments still registered after close"


def test_cuda_segments_are_registered_once_per_mapping(daemon, monkeypatch):
    regs = Registrations(monkeypatch)
    c = ckpt(daemon, "cudaonce", keep_last=2)
    x = torch.randn(4 * MiB, device="cuda")
    keys = set()
    for step in range(1, 9):
        c.save(step, {"x": x})
        c.wait()
        keys |= set(c._maps)
    assert regs.registered == len(keys), (regs.registered, len(keys))  # once per mapping, not per save
    assert len(regs.live) == sum(s.registered for s in c._maps.values())
    c.close()
    assert regs.live == {}


def test_cuda_save_returns_before_the_copy_and_the_state_changes_only_after_it(daemon):
    """Without attach(): the trainer's stream waits for the copy. With attach(opt): the optimizer's
    step does. Either way the saved bytes are the values at save()."""
    d = devices()[0]
    for attach in (False, True):
        p = torch.nn.Parameter(torch.randn(16 * MiB, device=d))  # 64 MiB: the copy takes a while
        opt = torch.optim.SGD([p], lr=1.0)
        c = ckpt(daemon, f"cudawait{int(attach)}")
        if attach:
            c.attach(opt)
        before = p.detach().clone()
        torch.cuda.synchronize()
        c.save(1, {"p": p})
        p.grad = torch.ones_like(p)
        if attach:
            opt.step()           # waits (on the GPU) for the copy
        else:
            with torch.no_grad():
                p.add_(1.0)      # queued behind the copy on the current stream
        c.wait()
        assert torch.equal(c.load(step=1)["p"], before.cpu())
        c.close()


def test_cuda_error_mid_copy_aborts_the_shard_and_keeps_earlier_steps(daemon, monkeypatch):
    c = ckpt(daemon, "cudaerr")
    x = torch.randn(1000, device="cuda")
    c.save(1, {"x": x})
    c.wait()
    real = torch.Tensor.copy_
    calls = {"n": 0}

    def failing_copy(self, src, non_blocking=False):
        if src.is_cuda and not self.is_cuda:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return real(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(TierckptError) as e:
        c.save(2, {"a": torch.randn(10, device="cuda"), "b": torch.randn(10, device="cuda")})
    assert "aborted" in str(e.value) and "illegal memory access" in str(e.value), str(e.value)
    monkeypatch.undo()
    assert c.client.status()["memory"]["reservations"] == 0
    assert c.latest_step() == 1 and torch.equal(c.load()["x"], x.cpu())


def test_cuda_restore_of_a_corrupt_chunk_leaves_no_corrupt_byte_on_the_device(daemon):
    c = ckpt(daemon, "cudaflip", async_save=False)
    x = torch.randn(3 * MiB, device="cuda")      # 12 MiB: three chunks
    c.save(1, {"x": x})
    (f,) = pathlib.Path(daemon["dir"]).glob("mem/ns/cudaflip/*/rank-*.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) - 100)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x40]))
    data_start = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    target = {"x": torch.zeros(3 * MiB, device="cuda")}
    with pytest.raises(CorruptError) as e:
        c.load(target, step=1)
    assert e.value.partial == ["x"]
    got, want = bits(target["x"].cpu()), bits(x.cpu())
    cut = 3 * 4 * MiB - data_start  # x's bytes in the last chunk, the corrupt one
    assert got[:cut] == want[:cut], "the verified chunks were not copied"
    assert got[cut:] == bytes(len(got) - cut), "bytes of the corrupt chunk reached the device"


def test_cuda_daemon_restart_neither_crashes_nor_leaks_registrations(tmpdir_shm, monkeypatch):
    regs = Registrations(monkeypatch)
    mem = tmpdir_shm / "mem"
    args = [binary("tierckptd"), "--memory-dir", str(mem), "--memory-tier-size", "256MiB"]

    def start():
        p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env={**os.environ, "TIERCKPT_LOG": "warn"})
        ready = json.loads(p.stdout.readline())
        return p, ready["socket"]

    d1, sock = start()
    d2 = None
    try:
        c = Checkpointer({"socket": sock, "namespace": "cudarestart", "checkpoint_frequency": 1},
                         rank=0, world_size=1)
        x = torch.randn(4 * MiB, device="cuda")
        c.save(1, {"x": x})
        c.wait()
        old = set(regs.live)
        assert old
        d1.kill()
        d1.wait()
        shutil.rmtree(mem, ignore_errors=True)
        d2, _ = start()
        c.save(2, {"x": x})
        c.wait()
        assert not (old & set(regs.live)), "a segment of the dead daemon is still registered"
        assert torch.equal(c.load(step=2)["x"], x.cpu())
        c.close()
        assert regs.live == {}
    finally:
        for p in (d1, d2):
            if p is not None:
                p.kill()
                p.wait()


def test_cuda_sealer_waits_for_the_event(daemon, monkeypatch):
    """The sealing thread seals only after the copies' events: a seal observed before is a bug."""
    seen = []
    real = checkpointer._wait_copies

    def spy(events):
        real(events)
        seen.append(all(ev.query() for _, ev in events))

    monkeypatch.setattr(checkpointer, "_wait_copies", spy)
    c = ckpt(daemon, "cudaevent")
    c.save(1, {"x": torch.randn(16 * MiB, device="cuda")})
    c.wait_copies(host=True)  # the host waits for the copy (not for the seal)
    assert all(ev.query() for _, ev in c._last_events)
    c.wait()
    assert seen == [True]


def test_cuda_a_dropped_checkpointer_unregisters_its_segments(daemon, monkeypatch):
    import gc
    regs = Registrations(monkeypatch)
    c = ckpt(daemon, "cudadropped")
    c.save(1, {"x": torch.randn(MiB, device="cuda")})
    assert regs.live
    del c
    gc.collect()
    assert regs.live == {}, "page-locked memory left behind by an unclosed Checkpointer"
