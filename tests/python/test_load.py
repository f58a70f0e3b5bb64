"""The one-pass load: every checksum chunk read once, verified, then copied; corrupt bytes never reach a tensor."""

import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest
import torch

from tierckpt import Checkpointer, Client, CorruptError

from conftest import wait_until
from test_checkpointer import assert_same, bits

MiB = 1 << 20


def ckpt(daemon, ns, **cfg):
    return Checkpointer({"socket": daemon["socket"], "namespace": ns, "checkpoint_frequency": 1, **cfg},
                        rank=0, world_size=1)


def big_state(seed=0):
    """About 14 MiB over four 4 MiB chunks: tensors straddle chunk boundaries, one lies in the last chunk."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(1_500_000, generator=g),                                     # 6 MB, f32
        "b": torch.randn(2000, 1000, generator=g).to(torch.bfloat16),                 # 4 MB
        "c": torch.randint(0, 256, (3 * MiB,), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn),
        "d": np.arange(100_000, dtype=np.int64),                                      # 0.8 MB
        "tail": (torch.arange(1000) % 251).to(torch.uint8),                           # 1-byte, after c: last
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "plain": {"epoch": 3},
    }


def zeros_like(state):
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        elif isinstance(v, np.ndarray):
            out[k] = np.zeros_like(v)
    return out


def shard_file(daemon, ns):
    (f,) = pathlib.Path(daemon["dir"]).glob(f"mem/ns/{ns}/*/rank-00000-of-00001.safetensors")
    return f


def flip(path, offset_from_end):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - offset_from_end)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))


def test_one_pass_load_round_trips_bitwise_into_targets_and_new_tensors(daemon):
    state = big_state()
    c = ckpt(daemon, "onepass")
    c.save(1, state)
    # in place: contiguous, non-contiguous (a transposed view of fresh memory), numpy; the rest new
    b_t = torch.zeros(1000, 2000, dtype=torch.bfloat16).t()
    assert not b_t.is_contiguous()
    target = {"a": torch.zeros(1_500_000), "b": b_t, "d": np.zeros(100_000, dtype=np.int64)}
    back = c.load(target, step=1)
    assert_same(back, state)
    assert back["a"] is target["a"] and back["b"] is target["b"] and back["d"] is target["d"]
    assert bits(target["b"]) == bits(state["b"])
    # and with no targets at all
    assert_same(ckpt(daemon, "onepass").load(step=1), state)


def test_flipped_byte_in_the_last_chunk_leaves_no_corrupt_byte_and_names_partial_targets(daemon):
    state = big_state()
    c = ckpt(daemon, "lastchunk", async_save=False)
    c.save(2, state)
    f = shard_file(daemon, "lastchunk")
    assert os.path.getsize(f) > 3 * 4 * MiB
    flip(f, 100)  # the last chunk: "tail" lies there, the earlier chunks verify
    target = zeros_like(state)
    with pytest.raises(CorruptError) as e:
        c.load(target, step=2)
    msg = str(e.value)
    assert "chunk 3" in msg and "do not train from them" in msg, msg
    # every byte is the saved one or the old one (zero): nothing unverified was copied
    for k, t in target.items():
        got = bits(t) if isinstance(t, torch.Tensor) else t.tobytes()
        want = bits(state[k]) if isinstance(state[k], torch.Tensor) else state[k].tobytes()
        assert all(x == y or x == 0 for x, y in zip(got, want)), f"{k}: a byte neither saved nor old"
    assert bits(target["tail"]) == bytes(1000), "the corrupt chunk's tensor was touched"
    assert "tail" not in e.value.partial and {"a", "c"} <= set(e.value.partial)
    assert bits(target["c"])[-(1 << 20):] == bytes(1 << 20), "c's bytes in the corrupt chunk were copied"


def test_flipped_byte_in_the_first_chunk_touches_no_target(daemon):
    state = big_state(seed=2)
    c = ckpt(daemon, "firstchunk", async_save=False)
    c.save(5, state)
    f = shard_file(daemon, "firstchunk")
    flip(f, os.path.getsize(f) - 4096)  # in chunk 0, past the header
    target = zeros_like(state)
    with pytest.raises(CorruptError) as e:
        c.load(target, step=5)
    assert "chunk 0" in str(e.value) and e.value.partial == []
    for k, t in target.items():
        assert not (bits(t) if isinstance(t, torch.Tensor) else t.tobytes()).strip(b"\0"), k


def test_flipped_byte_in_the_last_chunk_falls_through_to_the_persistent_copy(draining_daemon):
    d = draining_daemon
    state = big_state(seed=4)
    c = ckpt(d, "fallthrough", async_save=False)
    c.save(3, state)

    def committed():
        st = Client(d["socket"]).status()["persistent"]
        ns = next((n for n in st["namespaces"] if n["namespace"] == "fallthrough"), {})
        return ns.get("last_committed") == 3

    wait_until(committed, what="step 3 committed to the persistent tier")
    flip(shard_file(d, "fallthrough"), 100)
    target = zeros_like(state)
    back = c.load(target, step=3)
    assert_same(back, state)
    for k in target:
        assert back[k] is target[k]


def test_a_flipped_byte_is_caught_when_loading_into_new_tensors(daemon):
    state = big_state(seed=3)
    c = ckpt(daemon, "direct", async_save=False)
    c.save(6, state)
    f = shard_file(daemon, "direct")
    flip(f, os.path.getsize(f) - 6 * MiB)  # chunk 1: inside "a"
    with pytest.raises(CorruptError) as e:
        c.load(step=6)
    assert "chunk 1" in str(e.value) and e.value.partial == []


def test_a_load_lets_go_of_its_tensors_when_the_caller_does(daemon):
    """No reference cycle keeps the memory of loaded tensors alive until the next garbage collection
    (64 MiB tensors: above glibc's mmap threshold, so freeing them gives the memory back at once)."""
    import gc

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

    c = ckpt(daemon, "refs")
    c.save(1, {"w": torch.ones(16 * MiB)})
    c.wait()
    gc.collect()
    gc.disable()
    try:
        before = rss_mib()
        for _ in range(3):
            back = c.load(step=1)
            assert back["w"][-1] == 1.0
            del back
        assert rss_mib() - before < 48, f"{rss_mib() - before} MiB still held after the loads"
    finally:
        gc.enable()


def test_an_explicit_step_only_the_persistent_tier_holds_is_loaded_from_there(tmp_path_factory):
    """A node whose memory was lost (a new daemon on an empty memory directory) loads `step=N` from the
    persistent tier: the wait for a seal in flight must not stop at "not in this node's memory"."""
    from conftest import run_daemon
    store = tempfile.mkdtemp(prefix="tierckpt-store-", dir="/dev/shm")
    flags = ("--persistent-path", f"file://{store}", "--persist-every", "1")
    state = big_state(3)
    try:
        first = run_daemon(*flags)
        d = next(first)
        with ckpt(d, "lost") as c:
            c.save(1, state)
            c.save(2, big_state(4))
            c.wait()
            cl = c.client
            wait_until(lambda: any(ns.get("namespace") == "lost" and (ns.get("last_committed") or -1) >= 2
                                   for ns in (cl.status().get("persistent") or {}).get("namespaces", [])),
                       timeout=60, what="step 2 drained")
        first.close()  # SIGKILLs the daemon and removes its memory directory
        second = run_daemon(*flags)
        d2 = next(second)
        with ckpt(d2, "lost") as c:
            out = c.load(zeros_like(state), step=1)
        second.close()
        assert_same(out, state)
    finally:
        shutil.rmtree(store, ignore_errors=True)
