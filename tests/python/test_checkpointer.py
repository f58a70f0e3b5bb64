"""The Python Checkpointer against a real tierckptd: round trips, formats, errors, crashes."""

import json
import math
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch

import tierckpt
from tierckpt import AlreadyExistsError, Checkpointer, Client, CorruptError, UnavailableError

from conftest import py_env, tierckpt as cli, wait_until


def ckpt(daemon, ns="job", **cfg):
    return Checkpointer({"socket": daemon["socket"], "namespace": ns, "checkpoint_frequency": 1, **cfg},
                        rank=0, world_size=1)


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(a, b, path="state"):
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert bits(a) == bits(b), f"{path}: bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
        if isinstance(a, float):
            assert math.copysign(1, a) == math.copysign(1, b), path


def train_state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_model_optimizer_rng_and_plain_values_round_trip_bitwise(daemon):
    model, opt = train_state()
    gen = torch.Generator().manual_seed(7)
    state = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "gen": gen.get_state(),
                "python": random.getstate(), "numpy": np.random.get_state()},
        "plain": {"epoch": 3, "big": 2**80, "neg": -5, "lr": 0.1, "inf": float("inf"), "ninf": -float("inf"),
                  "nan": float("nan"), "negzero": -0.0, "s": "naïve ✓", "b": True, "none": None,
                  "list": [1, [2.5, "x"], (3, None)], "tuple": (1, (2, 3)), "bytes": b"\x00\xffab",
                  1: "int key", (1, "a"): "tuple key", 2.5: "float key", None: "none key", True: "bool key",
                  "od": OrderedDict([("z", 1), ("a", 2)]), "dtype": torch.float16, "size": torch.Size([2, 3]),
                  "__tensor__": "not a tag", "tagged": {"__tuple__": [1]}},
    }
    c = ckpt(daemon)
    c.save(10, state)
    c.wait()
    assert c.latest_step() == 10

    model2, opt2 = train_state(seed=1)
    target = {"model": model2.state_dict()}
    back = Checkpointer({"socket": daemon["socket"], "namespace": "job"}, rank=0, world_size=1).load(target)
    assert_same(back, state)
    # the model's tensors were filled in place
    for k, v in model2.state_dict().items():
        assert bits(v) == bits(state["model"][k]) and back["model"][k] is target["model"][k]
    opt2.load_state_dict(back["optim"])
    assert_same(opt2.state_dict(), opt.state_dict())
    torch.set_rng_state(back["rng"]["torch"])
    a = torch.rand(3)
    torch.set_rng_state(state["rng"]["torch"])
    assert torch.equal(a, torch.rand(3))


DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64]


def test_every_dtype_empty_scalar_and_noncontiguous_tensors(daemon):
    g = torch.Generator().manual_seed(3)
    state = {}
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        if dt == torch.bool:
            full = torch.randint(0, 2, (6, 5), generator=g) == 1
        else:
            es = torch.empty(0, dtype=dt).element_size()
            full = torch.randint(0, 256, (30 * es,), dtype=torch.uint8, generator=g).view(dt).reshape(6, 5)
        state[name] = {"full": full, "t": full.t(), "strided": full[::2, 1::2], "scalar": full[1, 1].clone(),
                       "empty": full[:0], "empty3": torch.empty((2, 0, 3), dtype=dt)}
    assert not state["float32"]["t"].is_contiguous()
    c = ckpt(daemon)
    c.save(1, state)
    back = c.load(step=1)
    assert_same(back, state)
    for name in state:
        assert back[name]["scalar"].dim() == 0


def test_shard_is_readable_by_the_safetensors_package(daemon):
    from safetensors.numpy import load_file
    model, opt = train_state()
    state = {"model": model.state_dict(), "x": torch.arange(10, dtype=torch.int16)[::3], "meta": {"a": 1}}
    c = ckpt(daemon, ns="interop")
    c.save(5, state)
    c.wait()
    out = pathlib.Path(daemon["dir"]) / "export"
    r = cli(daemon["socket"], "export", "interop", "--format", "safetensors", str(out), "--json")
    assert r.returncode == 0, r.stderr
    (f,) = json.loads(r.stdout)["files"]
    t = load_file(f)
    assert np.array_equal(t["model.0.weight"], model.state_dict()["0.weight"].numpy())
    assert np.array_equal(t["x"], np.array([0, 3, 6, 9], dtype=np.int16))
    r = cli(daemon["socket"], "inspect", "interop", "--json")
    shard = json.loads(r.stdout)["shards"][0]
    assert shard["verified"] and shard["metadata"]["step"] == "5"


@pytest.mark.parametrize("cfg,key", [
    ({"checkpoint_frequncy": 5}, "checkpoint_frequncy"),
    ({"checkpoint_frequency": 0}, "checkpoint_frequency"),
    ({"checkpoint_frequency": "often"}, "checkpoint_frequency"),
    ({"memory_tier_size": "lots"}, "memory_tier_size"),
    ({"compression": "gzip"}, "compression"),
    ({"compression": "zstd:99"}, "compression"),
    ({"async_save": "yes"}, "async_save"),
    ({"persistent_path": "/no/scheme"}, "persistent_path"),
    ({"keep_last": 0}, "keep_last"),
    ({"namespace": "a/b"}, "namespace"),
    ({"mtbf_s": -1}, "mtbf_s"),
    ({"min_interval": 10, "max_interval": 5}, "max_interval"),
])
def test_bad_config_names_the_key(daemon, cfg, key):
    with pytest.raises(ValueError) as e:
        Checkpointer({"socket": daemon["socket"], **cfg}, rank=0, world_size=1)
    assert repr(key) in str(e.value), str(e.value)


def test_unsupported_value_raises_type_error_naming_its_path(daemon):
    c = ckpt(daemon)

    class Thing:
        pass

    with pytest.raises(TypeError) as e:
        c.save(1, {"model": {"w": torch.zeros(2)}, "extra": [1, {"obj": Thing()}]})
    assert "state['extra'][1]['obj']" in str(e.value) and "Thing" in str(e.value)
    with pytest.raises(TypeError) as e:
        c.save(1, {"k": {object(): 1}})
    assert "state['k']" in str(e.value)
    assert c.latest_step() is None
    # nothing was reserved: the step can still be saved
    c.save(1, {"w": torch.ones(3)})


def test_no_daemon_is_unavailable_naming_the_socket(tmp_path):
    sock = str(tmp_path / "nothing.sock")
    with pytest.raises(UnavailableError) as e:
        Client(sock)
    assert sock in str(e.value) and "tierckptd" in str(e.value)


def test_nothing_saved_loads_none(daemon):
    assert ckpt(daemon, ns="empty").load({"w": torch.zeros(1)}) is None


def test_flipped_byte_is_detected_never_loaded(daemon):
    c = ckpt(daemon, ns="flip", async_save=False)
    w = torch.arange(100_000, dtype=torch.float32)
    c.save(3, {"w": w})
    files = list(pathlib.Path(daemon["dir"]).glob("mem/ns/flip/*/rank-00000-of-00001.safetensors"))
    assert len(files) == 1
    with open(files[0], "r+b") as f:
        f.seek(os.path.getsize(files[0]) - 1000)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    target = {"w": torch.zeros(100_000)}
    with pytest.raises(CorruptError) as e:
        c.load(target, step=3)
    assert "chunk" in str(e.value)
    assert torch.count_nonzero(target["w"]) == 0, "corrupt bytes reached the state"


def test_two_writers_of_one_step_one_gets_already_exists(daemon):
    a = ckpt(daemon, ns="race")
    b = ckpt(daemon, ns="race")
    res = a.client.reserve("race", 4, 0, 1, 64)  # a holds the reservation, unsealed
    with pytest.raises(AlreadyExistsError) as e:
        b.save(4, {"w": torch.ones(2)})
    assert "already exists" in str(e.value)
    a.client.abort(res["id"])
    b.save(5, {"w": torch.ones(2)})
    with pytest.raises(AlreadyExistsError):
        a.save(5, {"w": torch.zeros(2)})
    assert torch.equal(a.load(step=5)["w"], torch.ones(2))


def test_sigkill_mid_save_leaves_nothing_visible(daemon, tmp_path):
    """A trainer killed between reserve and seal: its step never appears, the previous one loads."""
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch, tierckpt
        from tierckpt import shard
        c = tierckpt.Checkpointer({{"socket": {daemon['socket']!r}, "namespace": "crash",
                                    "checkpoint_frequency": 1, "async_save": False}}, rank=0, world_size=1)
        c.save(1, {{"w": torch.full((1000,), 1.0)}})
        real = shard.write
        def slow_write(buf, header, tensors):
            real(buf, header, tensors)
            print("written", flush=True)
            time.sleep(600)
        shard.write = slow_write
        c.save(2, {{"w": torch.full((1000,), 2.0)}})
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=py_env())
    try:
        assert proc.stdout.readline().strip() == "written"
        st = Client(daemon["socket"]).status()
        assert st["memory"]["reservations"] == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    c = only_step_1_survives(daemon, "crash")
    c.save(2, {"w": torch.full((1000,), 3.0)})  # the step is free again


def only_step_1_survives(daemon, ns):
    """After a trainer killed while saving step 2: its reservation is reclaimed, step 1 alone is there and loads."""
    c = ckpt(daemon, ns=ns)
    wait_until(lambda: c.client.status()["memory"]["reservations"] == 0, what="reservation reclaimed")
    assert c.latest_step() == 1
    assert [s["step"] for s in c.client.list_steps(ns)] == [1]
    assert torch.equal(c.load()["w"], torch.full((1000,), 1.0))
    return c


def test_heartbeat_file_is_touched_by_should_save_and_save(daemon, tmp_path, monkeypatch):
    hb = tmp_path / "heartbeat"
    monkeypatch.setenv("TIERCKPT_HEARTBEAT_FILE", str(hb))
    c = ckpt(daemon, ns="hb")
    c.should_save(1)
    assert hb.read_text().strip() == "1"
    os.utime(hb, (0, 0))
    c._hb_last = 0.0
    c.save(7, {"w": torch.ones(1)})
    assert hb.read_text().strip() == "7" and hb.stat().st_mtime > 0
    os.utime(hb, (0, 0))
    c.should_save(8)   # within 100 ms of the last beat: rate-limited
    assert hb.stat().st_mtime == 0
    c._hb_last -= 1.0
    c.should_save(9)
    assert hb.stat().st_mtime > 0 and hb.read_text().strip() == "9"


def test_checkpointer_starts_a_daemon_when_none_answers(tmpdir_shm, monkeypatch):
    from conftest import binary
    sock = tmpdir_shm / "mem" / "daemon.sock"
    monkeypatch.setenv("TIERCKPT_DAEMON_BIN", binary("tierckptd"))
    store = tmpdir_shm / "persistent"
    c = Checkpointer({"socket": str(sock), "namespace": "auto", "memory_tier_size": "64MiB", "keep_last": 2,
                      "checkpoint_frequency": 1, "persistent_path": f"file://{store}", "compression": "lz4"},
                     rank=0, world_size=1)
    st = c.client.status()
    try:
        assert st["memory"]["capacity"] == 64 << 20 and st["memory"]["keep_last"] == 2
        assert st["socket"] == str(sock)
        assert st["persistent"]["url"] == f"file://{store}" and st["persistent"]["compression"] == "lz4"
        c.save(1, {"w": torch.arange(4)})
        assert torch.equal(c.load()["w"], torch.arange(4))
    finally:
        c.close()
        os.kill(st["pid"], signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{st['pid']}") or
               open(f"/proc/{st['pid']}/stat").read().split()[2] == "Z", what="daemon gone")


def test_no_daemon_and_no_binary_says_how_to_start_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TIERCKPT_DAEMON_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UnavailableError) as e:
        Checkpointer({"socket": str(tmp_path / "d.sock")}, rank=0, world_size=1)
    assert str(tmp_path / "d.sock") in str(e.value) and "tierckptd" in str(e.value)


def test_rank_and_world_size_from_the_environment(daemon, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    c = Checkpointer({"socket": daemon["socket"], "namespace": "envrank"})
    assert (c.rank, c.world_size) == (1, 2)
    c.save(3, {"w": torch.ones(1)})
    c.wait()
    (s,) = c.client.list_steps("envrank")
    assert s["ranks"] == [1] and s["world_size"] == 2 and not s["complete"]
    assert c.latest_step() is None   # rank 0 is missing: not complete


def test_the_daemon_persists_the_steps_should_save_chose(draining_daemon):
    c = Checkpointer({"socket": draining_daemon["socket"], "namespace": "tiers", "checkpoint_frequency": 1,
                      "persist_every": 3, "keep_last": 10}, rank=0, world_size=1)
    store = pathlib.Path(draining_daemon["dir"]) / "store" / "tiers"

    def drained(step):
        st = c.client.status()["persistent"]
        ns = next((n for n in st["namespaces"] if n["namespace"] == "tiers"), {})
        return ns.get("last_committed") == step or ns.get("skipped", 0) + len(committed()) >= step

    def committed():
        return sorted(int(p.name) for p in store.glob("*") if (p / "COMMIT").exists()) if store.exists() else []

    chosen = []
    for step in range(1, 7):
        tiers = c.should_save(step)
        assert "memory" in tiers
        if "persistent" in tiers:
            chosen.append(step)
        c.save(step, {"w": torch.full((4,), float(step))}, tiers)
        c.wait()
        wait_until(lambda: drained(step), what=f"the drainer to decide step {step}")
    assert chosen == [3, 6]
    assert committed() == chosen


def test_tensor_on_meta_device_raises_type_error_naming_its_path(daemon):
    c = ckpt(daemon, ns="meta")
    with pytest.raises(TypeError) as e:
        c.save(1, {"model": {"w": torch.ones(2), "lazy": torch.empty(3, device="meta")}})
    assert "state['model']['lazy']" in str(e.value) and "meta" in str(e.value), str(e.value)
    assert c.client.status()["memory"]["reservations"] == 0
    c.save(1, {"model": {"lazy": torch.ones(3)}})
    with pytest.raises(TypeError) as e:
        c.load({"model": {"lazy": torch.empty(3, device="meta")}}, step=1)
    assert "model.lazy" in str(e.value) and "meta" in str(e.value), str(e.value)


def test_sigkill_between_enqueue_and_seal_leaves_nothing_visible(daemon, tmp_path):
    """save() returns with the copy done (or enqueued) and the seal left to the sealing thread; a trainer
    killed before that thread seals leaves nothing visible, the reservation dies with its connection."""
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import os, time, torch, tierckpt
        from tierckpt import checkpointer
        c = tierckpt.Checkpointer({{"socket": {daemon['socket']!r}, "namespace": "enq",
                                    "checkpoint_frequency": 1, "async_save": True}}, rank=0, world_size=1)
        c.save(1, {{"w": torch.full((1000,), 1.0)}})
        c.wait()
        def stuck_copy(events):  # the sealing thread waits here for the copies' events
            os.write(1, b"sealer waiting\\n")  # one write: the two threads' lines never interleave
            time.sleep(600)
        checkpointer._wait_copies = stuck_copy
        c.save(2, {{"w": torch.full((1000,), 2.0)}})
        os.write(1, b"save returned\\n")
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=py_env())
    try:
        lines = {proc.stdout.readline().strip(), proc.stdout.readline().strip()}
        assert lines == {"sealer waiting", "save returned"}, lines
        assert Client(daemon["socket"]).status()["memory"]["reservations"] == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    only_step_1_survives(daemon, "enq")


def test_a_copy_failing_in_the_background_aborts_its_shard_and_wait_says_so(daemon, monkeypatch):
    from tierckpt import TierckptError, checkpointer
    c = ckpt(daemon, ns="bgfail")
    c.save(1, {"w": torch.ones(4)})
    c.wait()

    def failing(events):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    monkeypatch.setattr(checkpointer, "_wait_copies", failing)
    c.save(2, {"w": torch.full((4,), 2.0)})
    with pytest.raises(TierckptError) as e:
        c.wait()
    assert "step 2 was not saved" in str(e.value) and "illegal memory access" in str(e.value), str(e.value)
    assert c.client.status()["memory"]["reservations"] == 0
    assert c.latest_step() == 1 and torch.equal(c.load()["w"], torch.ones(4))
    monkeypatch.undo()
    c.save(2, {"w": torch.full((4,), 3.0)})  # the step was aborted: it can be saved again
    c.wait()
    assert torch.equal(c.load(step=2)["w"], torch.full((4,), 3.0))


def test_a_background_failure_is_a_warning_at_the_next_save(daemon, monkeypatch):
    from tierckpt import checkpointer
    c = ckpt(daemon, ns="bgwarn")
    monkeypatch.setattr(checkpointer, "_wait_copies", lambda events: 1 / 0)
    c.save(1, {"w": torch.ones(4)})
    c._sealer.flush()
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="step 1 .* was not saved"):
        c.save(2, {"w": torch.ones(4)})
    with pytest.raises(tierckpt.TierckptError, match="step 1 was not saved"):
        c.wait()
    c.wait()  # reported once
    assert c.latest_step() == 2


def test_a_daemon_restart_neither_breaks_the_trainer_nor_keeps_old_segments_mapped(tmpdir_shm):
    from conftest import binary
    mem = tmpdir_shm / "mem"
    args = [binary("tierckptd"), "--memory-dir", str(mem), "--memory-tier-size", "64MiB"]

    def start():
        p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env={**os.environ, "TIERCKPT_LOG": "warn"})
        ready = json.loads(p.stdout.readline())
        assert ready["event"] == "ready", ready
        return p, ready["socket"]

    def mapped():
        return [line for line in open("/proc/self/maps") if str(mem) in line]

    d1, sock = start()
    d2 = None
    try:
        c = Checkpointer({"socket": sock, "namespace": "restart", "checkpoint_frequency": 1},
                         rank=0, world_size=1)
        for step in (1, 2):
            c.save(step, {"w": torch.full((100_000,), float(step))})
        c.wait()
        assert mapped()
        d1.kill()
        d1.wait()
        shutil.rmtree(mem, ignore_errors=True)  # the new daemon starts empty: the old segments are gone
        d2, sock2 = start()
        assert sock2 == sock
        c.save(3, {"w": torch.full((100_000,), 3.0)})  # reconnects; no exception
        c.wait()
        assert torch.equal(c.load(step=3)["w"], torch.full((100_000,), 3.0))
        assert not [line for line in mapped() if "(deleted)" in line], mapped()
        c.close()
        assert not mapped()
    finally:
        for p in (d1, d2):
            if p is not None:
                p.kill()
                p.wait()


def test_a_dropped_checkpointer_seals_its_saves_and_unmaps_its_segments(daemon):
    import gc
    mem = pathlib.Path(daemon["dir"]) / "mem"

    def mapped():
        return [line for line in open("/proc/self/maps") if str(mem) in line]

    c = ckpt(daemon, ns="dropped")
    c.save(1, {"w": torch.full((100_000,), 1.0)})
    assert mapped()
    del c
    gc.collect()
    assert not mapped(), mapped()
    c = ckpt(daemon, ns="dropped")
    c.client.wait_visible("dropped", 1, 0, 60_000)
    assert torch.equal(c.load()["w"], torch.full((100_000,), 1.0))


def test_attach_installs_a_step_pre_hook_that_is_a_no_op_on_the_cpu(daemon):
    c = ckpt(daemon, ns="attach")
    model, opt = train_state()
    handle = c.attach(opt)
    assert c._attached == 1 and len(opt._optimizer_step_pre_hooks) == 1
    c.save(1, {"model": model.state_dict(), "optim": opt.state_dict()})
    model(torch.randn(5, 8)).pow(2).mean().backward()
    opt.step()  # the hook runs: nothing to wait for on the CPU
    c.wait()
    handle.remove()
    assert c._attached == 0 and len(opt._optimizer_step_pre_hooks) == 0
    assert c.load(step=1)["optim"]["state"][0]["step"] == torch.tensor(3.0)


def test_save_after_close_says_so_and_reserves_nothing(daemon):
    c = ckpt(daemon, ns="closed")
    c.save(1, {"w": torch.ones(2)})
    c.close()
    with pytest.raises(tierckpt.TierckptError, match="after close"):
        c.save(2, {"w": torch.ones(2)})
    c2 = ckpt(daemon, ns="closed")
    assert c2.latest_step() == 1 and c2.client.status()["memory"]["reservations"] == 0
