"""`python -m tierckpt.bench`: tierckpt's Python save and restore beside the floor, torch.save and DCP.

One state dict of `--size` bytes (`--tensors` tensors of `--dtype` on `--device`) is saved and restored, in one
run, by every method side by side, and every figure is also given as a ratio to the *floor* measured in the
same run: the cheapest way to move the same bytes (on a GPU, device-to-host into a preallocated pinned buffer
and host-to-device back; on a CPU, a one-thread copy into a preallocated, pre-faulted buffer and back).

Methods: `tierckpt` is the Checkpointer (async_save, the default), `tierckpt_sync` the Checkpointer with
async_save off (save returns once the step is visible); `dcp_save`, `dcp_async_save`(`_stager`) and `dcp_load`
are plain DCP on files; `dcp_save_tierckpt`, `dcp_async_save_tierckpt` and `dcp_load_tierckpt` are DCP through
tierckpt (`TierckptWriter`, `TierckptStager`, `TierckptReader`), each also given as a ratio to the Checkpointer
row it stands for (`vs_checkpointer`: dcp.save to `tierckpt_sync`, async_save to `tierckpt`), measured on
`--saves` interleaved pairs (a Checkpointer save, then the DCP save), so both see the same daemon and load
(`rows`: the same ratio from the rows' steady medians, which ran one after the other).

Each save method reports three times, from the start of the call:
  blocked  - until the call returns;
  free     - until the state may change again (CPU: when `save()` returns, as the copy is done by then;
             CUDA: `ckpt.wait_copies(host=True)` (the last save's copies done);
             DCP's stager: its staging future);
  visible  - until the checkpoint can be restored (`Checkpointer.wait()`, DCP's upload future).
The first save of each method (fresh memory, its first call at this size) is reported apart from the steady
state: after `--warmup` saves (reported as a list, not counted), `--saves` more, one after another, each
followed by its wait (medians; each one listed too). tierckpt also runs `--saves` saves back to back, without
waiting in between, and reports the median time blocked (and the worst).

Fresh data: before every save (outside the timed region) every tensor gets new bytes (`--fresh bytes`: the
save's number in its first 8 bytes and 16 random bytes at a random place; `--fresh all`: all of it
regenerated), so no save sees the bytes of the one before it. Before tierckpt's first save the bench calls
`Checkpointer.prepare(state)`, as a trainer would before training (its time is reported as `prepare`;
`--no-prepare` leaves it out, and the first save then maps and faults its segment in itself). Every restore is checked bitwise against the
state that was saved (xxh3-128 of every tensor), and the report says so per method.

`--mode train` runs a model whose step takes `--step-ms` (a calibrated loop of matmuls, or a sleep), first
without checkpoints and then checkpointing every step with tierckpt (before the update that changes the state,
a step waits until the state is free), and reports the mean step time of `--steps` steps after `--warmup`
steps, and the overhead: (with - without) / without.

A daemon: the one at `--socket` or $TIERCKPT_SOCKET when given, else the bench starts its own `tierckptd`
($TIERCKPT_DAEMON_BIN, else `tierckptd` on PATH) on a temporary directory in /dev/shm and stops it at exit.
Files for torch.save and DCP go to a temporary directory in /dev/shm, removed at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import xxhash

from .checkpointer import Checkpointer
from .errors import TierckptError, UnavailableError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "uint8": "uint8"}
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SAVE_METHODS = ("tierckpt", "tierckpt_sync", "torch_save", "dcp_save", "dcp_async_save", "dcp_async_save_stager",
                "dcp_save_tierckpt", "dcp_async_save_tierckpt")
RESTORE_METHODS = ("floor", "tierckpt", "dcp_load", "dcp_load_tierckpt", "torch_load")
# DCP through tierckpt (`tierckpt.torch`) and the Checkpointer row its time blocked is compared with
VS_CHECKPOINTER = {"dcp_save_tierckpt": "tierckpt_sync", "dcp_async_save_tierckpt": "tierckpt"}


def parse_size(s: str) -> int:
    """Bytes in "8MB", "1GiB", "512MiB", "1048576"; ValueError names a bad size."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", s, re.IGNORECASE)
    if not m:
        raise ValueError(f"--size {s!r}: expected a size such as 8MB, 1GB or 512MiB")
    n = int(float(m.group(1)) * UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise ValueError(f"--size {s!r}: must be more than 0 bytes")
    return n


def _torch():
    import torch
    return torch


# -- the state -----------------------------------------------------------------

def make_state(size: int, tensors: int, dtype: str, device: str) -> dict:
    """`tensors` tensors of random bytes, together `size` bytes (rounded down to whole elements)."""
    torch = _torch()
    dt = getattr(torch, DTYPES[dtype])
    esize = torch.empty(0, dtype=dt).element_size()
    elems = max(1, size // esize)
    tensors = max(1, min(tensors, elems))
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(tensors):
        n = elems // tensors + (1 if i < elems % tensors else 0)
        raw = torch.randint(0, 256, (n * esize,), dtype=torch.uint8, generator=gen)
        state[f"layer{i:03d}.weight"] = raw.view(dt).to(device)
    return state


def state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _u8(t):
    return t.detach().reshape(-1).view(_torch().uint8)


def freshen(state: dict, counter: int, how: str, rng) -> None:
    """Gives every tensor new bytes before a save (see the module doc)."""
    torch = _torch()
    with torch.no_grad():
        for t in state.values():
            b = _u8(t)
            if how == "all":
                b.random_(0, 256)
                continue
            stamp = torch.tensor(list(counter.to_bytes(8, "little")), dtype=torch.uint8, device=b.device)
            k = min(8, b.numel())
            b[:k] = stamp[:k]
            if b.numel() > 16:
                at = rng.randrange(0, b.numel() - 16)
                b[at:at + 16] = torch.tensor(list(rng.randbytes(16)), dtype=torch.uint8, device=b.device)


def digest(state: dict) -> dict:
    """xxh3-128 of every tensor's bytes (copied to the host first where they live on a device)."""
    out = {}
    for name, t in state.items():
        b = _u8(t)
        if b.device.type != "cpu":
            b = b.cpu()
        out[name] = xxhash.xxh3_128_hexdigest(b.contiguous().numpy().data) if b.numel() else ""
    return out


def clobber(state: dict) -> None:
    """Overwrites the state before a restore, so that a restore that copies nothing is not bitwise."""
    torch = _torch()
    with torch.no_grad():
        for t in state.values():
            _u8(t).fill_(0xA5)


def _sync(device: str) -> None:
    if device == "cuda":
        _torch().cuda.synchronize()


# -- the floor -----------------------------------------------------------------

class Floor:
    """A preallocated host buffer of the state's size: pinned on a GPU, pre-faulted memory on a CPU."""

    def __init__(self, state: dict, device: str):
        torch = _torch()
        self.device = device
        total = state_bytes(state)
        self.buf = torch.empty(total, dtype=torch.uint8, pin_memory=(device == "cuda"))
        self.buf.fill_(0)  # fault every page in before anything is timed
        self.views, off = {}, 0
        for name, t in state.items():
            n = t.numel() * t.element_size()
            self.views[name] = self.buf[off:off + n]
            off += n

    def _copy(self, state: dict, to_host: bool) -> None:
        torch = _torch()
        threads = torch.get_num_threads()
        if self.device == "cpu":
            torch.set_num_threads(1)  # the floor is a one-thread copy
        try:
            with torch.no_grad():
                for name, t in state.items():
                    if to_host:
                        self.views[name].copy_(_u8(t), non_blocking=True)
                    else:
                        _u8(t).copy_(self.views[name], non_blocking=True)
            _sync(self.device)
        finally:
            torch.set_num_threads(threads)

    def save(self, state: dict) -> None:
        self._copy(state, to_host=True)

    def restore(self, state: dict) -> None:
        self._copy(state, to_host=False)


# -- a daemon ------------------------------------------------------------------

class Daemon:
    """The daemon the bench talks to: an existing one, or its own `tierckptd` on a temporary directory."""

    def __init__(self, socket: str | None, size: int, workdir: str):
        self.proc = None
        self.binary = None
        self.workdir = None
        socket = socket or os.environ.get("TIERCKPT_SOCKET")
        if socket:
            self.socket, self.started = socket, False
            return
        exe = os.environ.get("TIERCKPT_DAEMON_BIN") or shutil.which("tierckptd")
        if not exe:
            raise UnavailableError("no daemon to benchmark: set TIERCKPT_SOCKET (or --socket) to a running "
                                   "tierckptd, or TIERCKPT_DAEMON_BIN (or put `tierckptd` on PATH) for the "
                                   "bench to start one")
        self.binary, self.started, self.workdir = os.path.abspath(exe), True, workdir
        d = os.path.join(workdir, "daemon")
        os.makedirs(d)
        # keep_last 2 in each of three namespaces, a save in flight, back-to-back saves sealing
        cap = 10 * size + (256 << 20)
        log = open(os.path.join(d, "tierckptd.log"), "ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "--memory-dir", os.path.join(d, "mem"), "--socket", os.path.join(d, "daemon.sock"),
                 "--memory-tier-size", f"{cap // (1 << 20)}MiB", "--keep-last", "2"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
                env={**os.environ, "TIERCKPT_LOG": os.environ.get("TIERCKPT_LOG", "warn")})
        finally:
            log.close()
        line = self.proc.stdout.readline()
        try:
            ready = json.loads(line)
            assert ready.get("event") == "ready"
        except (ValueError, AssertionError):
            self.stop()
            raise UnavailableError(f"{self.binary} did not start: it printed {line!r}; see "
                                   f"{os.path.join(d, 'tierckptd.log')}") from None
        self.socket = ready["socket"]

    def build(self) -> str:
        """"release", "debug" or "unknown": from the binary's path (target/release or target/debug)."""
        if not self.binary:
            return "unknown"
        parts = self.binary.split(os.sep)
        return parts[-2] if len(parts) >= 2 and parts[-2] in ("release", "debug") else "unknown"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self.proc = None
        # As root the daemon mounts a huge-page tmpfs on its new memory directory (the default); the
        # mount outlives it, and this one is the bench's to remove.
        mem = os.path.join(self.workdir, "daemon", "mem") if self.workdir else None
        if mem and os.path.ismount(mem):
            subprocess.run(["umount", "-l", mem], check=False)


# -- measurements --------------------------------------------------------------

def _med(xs):
    return statistics.median(xs) if xs else None


def _times(blocked, free, visible) -> dict:
    return {"blocked_s": blocked, "free_s": free, "visible_s": visible}


def _series(first: dict, warmup: list, steady: list) -> dict:
    keys = ("blocked_s", "free_s", "visible_s")
    return {"first": first, "steady": {k: _med([s[k] for s in steady]) for k in keys},
            "each": {k: [s[k] for s in steady] for k in keys}, "n": len(steady),
            "warmup_visible_s": [s["visible_s"] for s in warmup]}


class Bench:
    """One run: the state, the floor, a Checkpointer and a scratch directory."""

    def __init__(self, args, workdir: str, daemon: Daemon):
        import random
        self.args = args
        self.device = args.device
        self.workdir = workdir
        self.rng = random.Random(1)
        self.counter = 0
        self.state = make_state(args.size, args.tensors, args.dtype, self.device)
        self.bytes = state_bytes(self.state)
        self.floor = Floor(self.state, self.device)
        self.namespace = f"bench-{os.getpid()}-{secrets.token_hex(4)}"
        self.ckpt = Checkpointer({"socket": daemon.socket, "namespace": self.namespace,
                                  "checkpoint_frequency": 1, "async_save": True}, rank=0, world_size=1)
        self.ckpt_sync = Checkpointer({"socket": daemon.socket, "namespace": f"{self.namespace}-sync",
                                       "checkpoint_frequency": 1, "async_save": False}, rank=0, world_size=1)
        self.step = 0
        self.sync_step = 0
        self.stager = None  # DCP's DefaultStager, kept across saves (run_save_mode)
        from .torch import TierckptReader, TierckptStager, TierckptWriter
        self.dcp_ns = f"{self.namespace}-dcp"
        self.dcp_writer = TierckptWriter(namespace=self.dcp_ns, socket=daemon.socket)
        self.dcp_stager = TierckptStager(self.dcp_writer)
        self.dcp_reader = TierckptReader(namespace=self.dcp_ns, socket=daemon.socket)
        self.dcp_step = 0

    def fresh(self) -> None:
        self.counter += 1
        freshen(self.state, self.counter, self.args.fresh, self.rng)
        _sync(self.device)

    def close(self) -> None:
        try:
            self.ckpt.wait()
            for ns in (self.namespace, f"{self.namespace}-sync", self.dcp_ns):
                self.ckpt.client.delete_namespace(ns)
        except Exception:
            pass
        self.dcp_stager.close()
        self.dcp_writer.close()
        self.dcp_reader.close()
        self.ckpt_sync.close()
        self.ckpt.close()

    # the copy is done when the state may change: the CUDA Checkpointer may return before it
    def _until_free(self) -> None:
        if self.device == "cuda":
            self.ckpt.wait_copies(host=True)

    # -- saves: each returns blocked, free, visible (seconds from the call) --
    def save_floor(self):
        t0 = time.perf_counter()
        self.floor.save(self.state)
        t = time.perf_counter() - t0
        return _times(t, t, t)

    def save_tierckpt(self):
        self.step += 1
        t0 = time.perf_counter()
        self.ckpt.save(self.step, self.state)
        t1 = time.perf_counter()
        self._until_free()
        t2 = time.perf_counter()
        self.ckpt.wait()
        t3 = time.perf_counter()
        return _times(t1 - t0, t2 - t0, t3 - t0)

    def save_tierckpt_sync(self):
        self.sync_step += 1
        t0 = time.perf_counter()
        self.ckpt_sync.save(self.sync_step, self.state)  # returns once the step is visible
        t = time.perf_counter() - t0
        return _times(t, t, t)

    def save_dcp_save_tierckpt(self):
        dcp = _dcp()
        self.dcp_step += 1
        t0 = time.perf_counter()
        dcp.save(self.state, checkpoint_id=self.dcp_step, storage_writer=self.dcp_writer, no_dist=True)
        t = time.perf_counter() - t0  # the metadata shard is sealed: the step is committed
        return _times(t, t, t)

    def save_dcp_async_save_tierckpt(self):
        dcp = _dcp()
        self.dcp_step += 1
        self.dcp_writer.step = self.dcp_step
        t0 = time.perf_counter()
        resp = dcp.async_save(self.state, storage_writer=self.dcp_writer, async_stager=self.dcp_stager,
                              no_dist=True)
        t1 = time.perf_counter()
        self.dcp_stager.synchronize_staging()  # CUDA: the device-to-host copies into the segment
        t2 = time.perf_counter()
        (getattr(resp, "upload_completion", None) or resp).result()
        t3 = time.perf_counter()
        return _times(t1 - t0, t2 - t0, t3 - t0)

    def save_torch_save(self):
        torch = _torch()
        path = os.path.join(self.workdir, "torch_save.pt")
        t0 = time.perf_counter()
        torch.save(self.state, path)
        t = time.perf_counter() - t0
        return _times(t, t, t)

    def save_dcp_save(self):
        dcp = _dcp()
        t0 = time.perf_counter()
        dcp.save(self.state, checkpoint_id=os.path.join(self.workdir, "dcp_save"), no_dist=True)
        t = time.perf_counter() - t0
        return _times(t, t, t)

    def save_dcp_async_save(self):
        dcp = _dcp()
        t0 = time.perf_counter()
        fut = dcp.async_save(self.state, checkpoint_id=os.path.join(self.workdir, "dcp_async_save"), no_dist=True)
        t1 = time.perf_counter()  # the default stager copies before async_save returns
        fut.result()
        t2 = time.perf_counter()
        return _times(t1 - t0, t1 - t0, t2 - t0)

    def save_dcp_async_save_stager(self):
        dcp = _dcp()
        t0 = time.perf_counter()
        resp = dcp.async_save(self.state, checkpoint_id=os.path.join(self.workdir, "dcp_async_save_stager"),
                              no_dist=True, async_stager=self.stager)
        t1 = time.perf_counter()
        staged = getattr(resp, "staging_completion", None)
        if staged is not None:
            staged.result()
        t2 = time.perf_counter()
        (getattr(resp, "upload_completion", None) or resp).result()
        t3 = time.perf_counter()
        return _times(t1 - t0, t2 - t0, t3 - t0)

    def interleaved(self, saves: int) -> dict:
        """Each DCP-through-tierckpt save right after a save of the Checkpointer row it stands for, `saves`
        rounds (fresh data before each): both see the same daemon and the same load, unlike rows run one
        after the other. Medians per method, and each DCP method's times over its Checkpointer's."""
        runs: dict = {m: [] for pair in VS_CHECKPOINTER.items() for m in pair}
        for _ in range(saves):
            for dcp_m, ck_m in VS_CHECKPOINTER.items():
                for m in (ck_m, dcp_m):
                    self.fresh()
                    runs[m].append(getattr(self, f"save_{m}")())
        med = {m: {k: _med([r[k] for r in rs]) for k in ("blocked_s", "free_s", "visible_s")}
               for m, rs in runs.items()}
        out = {"n": saves, "median": med, "each_blocked_s": {m: [r["blocked_s"] for r in rs] for m, rs in runs.items()}}
        for dcp_m, ck_m in VS_CHECKPOINTER.items():
            out[dcp_m] = {"of": ck_m, **{k.replace("_s", ""): med[dcp_m][k] / med[ck_m][k]
                                         for k in ("blocked_s", "free_s", "visible_s")}}
        return out

    def measure(self, fn, saves: int, warmup: int) -> dict:
        """The first save, `warmup` saves not counted, then `saves` saves: each with fresh data."""
        runs = []
        for _ in range(1 + warmup + saves):
            self.fresh()
            runs.append(fn())
        return _series(runs[0], runs[1:1 + warmup], runs[1 + warmup:])

    def prepare(self) -> dict:
        """`Checkpointer.prepare` before the first save, as a trainer would call it before training:
        seconds blocked in the call, and until the segment is mapped and faulted in."""
        t0 = time.perf_counter()
        self.ckpt.prepare(self.state)
        t1 = time.perf_counter()
        self.ckpt._join_prepare()
        t2 = time.perf_counter()
        # the daemon's filler now makes segments of this size: let it finish, as training steps would
        deadline = t2 + 60
        while time.perf_counter() < deadline and self.ckpt.client.status()["memory"].get("prefault_pending"):
            time.sleep(0.05)
        return {"blocked_s": t1 - t0, "mapped_s": t2 - t0, "ready_s": time.perf_counter() - t0}

    def back_to_back(self, saves: int) -> dict:
        """tierckpt saves one after another without waiting in between; the waits come at the end."""
        blocked = []
        t0 = time.perf_counter()
        for _ in range(saves):
            self.fresh()
            self.step += 1
            t = time.perf_counter()
            self.ckpt.save(self.step, self.state)
            self._until_free()
            blocked.append(time.perf_counter() - t)
        self.ckpt.wait()
        return {"blocked_s": _med(blocked), "max_blocked_s": max(blocked), "each_blocked_s": blocked,
                "all_visible_s": time.perf_counter() - t0, "n": saves}

    # -- restores: each returns (seconds, bitwise) --
    def _restore(self, fn):
        want = digest(self.state)
        clobber(self.state)
        _sync(self.device)
        t0 = time.perf_counter()
        got = fn()
        _sync(self.device)
        t = time.perf_counter() - t0
        if got is None:
            got = self.state
        ok = digest(got) == want
        if got is not self.state:
            self._put_back(got)
        return t, ok

    def _put_back(self, got) -> None:
        torch = _torch()
        with torch.no_grad():
            for name, t in self.state.items():
                if name in got and got[name].shape == t.shape and got[name].dtype == t.dtype:
                    t.copy_(got[name])

    def restore_floor(self):
        self.fresh()
        self.floor.save(self.state)
        return self._restore(lambda: self.floor.restore(self.state))

    def restore_tierckpt(self):
        step = self.step

        def load():
            self.ckpt.load(self.state, step=step)  # in place: same names, shapes and dtypes

        return self._restore(load)

    def restore_dcp_load(self):
        dcp = _dcp()
        path = os.path.join(self.workdir, "dcp_save")
        return self._restore(lambda: dcp.load(self.state, checkpoint_id=path, no_dist=True))

    def restore_dcp_load_tierckpt(self):
        dcp = _dcp()
        self.dcp_reader.step = self.dcp_step
        return self._restore(lambda: dcp.load(self.state, storage_reader=self.dcp_reader, no_dist=True))

    def restore_torch_load(self):
        torch = _torch()
        path = os.path.join(self.workdir, "torch_save.pt")
        return self._restore(lambda: torch.load(path, map_location=self.device, weights_only=True))

    def restores(self, method: str, n: int) -> dict:
        """`n` restores of the newest save of `method` into the state (torch.load: a new dict)."""
        # the state saved last by this method must be the one in memory: save it once more, fresh
        if method == "tierckpt":
            self.fresh()
            self.save_tierckpt()
        elif method == "dcp_load":
            self.fresh()
            self.save_dcp_save()
        elif method == "dcp_load_tierckpt":
            self.fresh()
            self.save_dcp_save_tierckpt()
        elif method == "torch_load":
            self.fresh()
            self.save_torch_save()
        fn = getattr(self, f"restore_{method}")
        ts, oks = [], []
        for _ in range(n):
            t, ok = fn()
            ts.append(t)
            oks.append(ok)
        return {"s": _med(ts), "first_s": ts[0], "bitwise": all(oks), "n": n}

    def sizes(self) -> dict:
        """Bytes each method keeps for one checkpoint of the state."""
        out = {"state": self.bytes}
        try:
            opened = self.ckpt.client.open(self.namespace, self.step, 0)
            out["tierckpt_shard"] = int(opened["manifest"]["file_len"])
            self.ckpt.client.release(self.namespace, self.step, 0)
        except Exception:
            out["tierckpt_shard"] = None
        p = os.path.join(self.workdir, "torch_save.pt")
        out["torch_save_file"] = os.path.getsize(p) if os.path.exists(p) else None
        for name in ("dcp_save", "dcp_async_save", "dcp_async_save_stager"):
            d = os.path.join(self.workdir, name)
            out[f"{name}_dir"] = (sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
                                  if os.path.isdir(d) else None)
        return out


def _dcp():
    # "torch.distributed is disabled ... single process" and "overwriting an existing checkpoint": both meant
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.checkpoint")
    import torch.distributed.checkpoint as dcp
    return dcp


def make_stager(device: str):
    """DCP's DefaultStager with its pinned-memory options (pinning and non-blocking copies need CUDA: on a
    CPU they are off) and the options used; (None, reason) where this torch has no such stager."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError as e:
        return None, f"this torch has no DefaultStager/StagingOptions ({e})"
    cuda = device == "cuda"
    opts = StagingOptions(use_pinned_memory=cuda, use_shared_memory=True, use_async_staging=True,
                          use_non_blocking_copy=cuda)
    return DefaultStager(opts), {k: getattr(opts, k) for k in ("use_pinned_memory", "use_shared_memory",
                                                               "use_async_staging", "use_non_blocking_copy")}


# -- the modes -----------------------------------------------------------------

def _ratios(times: dict, floor_s: float) -> dict:
    return {k.replace("_s", ""): (v / floor_s if v is not None and floor_s > 0 else None) for k, v in times.items()}


def run_save_mode(b: Bench, args) -> dict:
    out = {"save": {}, "restore": {}}
    floor = b.measure(b.save_floor, args.saves, args.warmup)
    floor_s = floor["steady"]["blocked_s"]
    out["floor"] = {"kind": "device-to-host into a preallocated pinned buffer" if b.device == "cuda"
                    else "one-thread copy into a preallocated, pre-faulted buffer",
                    "save_s": floor_s, "first_save_s": floor["first"]["blocked_s"], "n": floor["n"]}
    stager, stager_info = make_stager(b.device)
    b.stager = stager
    try:
        for m in SAVE_METHODS:
            if m == "dcp_async_save_stager" and stager is None:
                out["save"][m] = {"skipped": stager_info}
                continue
            prep = b.prepare() if m == "tierckpt" and args.prepare else None
            r = b.measure(getattr(b, f"save_{m}"), args.saves, args.warmup)
            if m == "tierckpt":
                r["prepare"] = prep or "off (--no-prepare)"
            r["ratio"] = _ratios(r["steady"], floor_s)
            r["first_ratio"] = _ratios(r["first"], floor_s)
            if m == "dcp_async_save_stager":
                r["options"] = stager_info
            out["save"][m] = r
            if m == "tierckpt":
                bb = b.back_to_back(args.saves)
                bb["ratio"] = bb["blocked_s"] / floor_s if floor_s > 0 else None
                r["back_to_back"] = bb
    finally:
        if stager is not None:
            stager.close()
    out["bytes"] = b.sizes()
    restore_floor = None
    for m in RESTORE_METHODS:
        r = b.restores(m, args.restores)
        if m == "floor":
            restore_floor = r["s"]
        r["ratio"] = r["s"] / restore_floor if restore_floor else None
        out["restore"][m] = r
    out["floor"]["restore_s"] = restore_floor
    # DCP through tierckpt over the Checkpointer: from interleaved saves, not from the rows (run in turn)
    out["interleaved"] = b.interleaved(args.saves)
    for m, of in VS_CHECKPOINTER.items():
        mine, theirs = out["save"][m]["steady"], out["save"][of]["steady"]
        out["save"][m]["vs_checkpointer"] = {**out["interleaved"][m], "rows": {
            k.replace("_s", ""): mine[k] / theirs[k] for k in ("blocked_s", "free_s", "visible_s")}}
    ours, theirs = out["restore"]["dcp_load_tierckpt"]["s"], out["restore"]["tierckpt"]["s"]
    out["restore"]["dcp_load_tierckpt"]["vs_checkpointer"] = {"of": "tierckpt", "s": ours / theirs}
    out["bitwise"] = all(r["bitwise"] for r in out["restore"].values())
    return out


def _step_fn(args, device: str):
    """A training step that takes about `--step-ms`: a calibrated number of matmuls, or a sleep."""
    torch = _torch()
    if args.step_kind == "sleep":
        return lambda: time.sleep(args.step_ms / 1000)
    n = 4096 if device == "cuda" else 256  # on a GPU, large enough not to be bound by kernel launches
    a = torch.randn(n, n, device=device) / n ** 0.5

    def work(k):
        x = a
        for _ in range(k):
            x = torch.tanh(x @ a)
        _sync(device)  # as a loss.item() would
        return x

    work(2)
    t0 = time.perf_counter()
    work(20)
    per = max((time.perf_counter() - t0) / 20, 1e-6)
    k = max(1, round(args.step_ms / 1000 / per))
    return lambda: work(k)


def run_train_mode(b: Bench, args) -> dict:
    step = _step_fn(args, b.device)

    def loop(checkpoint: bool) -> dict:
        times, blocked = [], []
        for _ in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            step()                    # forward and backward: the copy of the last save may still run
            if checkpoint:
                b._until_free()
            b.fresh()                 # the optimizer's update
            if checkpoint:
                b.step += 1
                t = time.perf_counter()
                try:
                    b.ckpt.save(b.step, b.state)
                except TierckptError as e:
                    # e.g. the daemon's seals fell behind and its memory tier filled up: report, do not hide
                    mem = (b.ckpt.client.status() or {}).get("memory")
                    return {"error": f"save {len(blocked) + 1} of {args.warmup + args.steps} (step {b.step}) "
                                     f"failed: {e}", "daemon_memory": mem}
                blocked.append(time.perf_counter() - t)
            times.append(time.perf_counter() - t0)
        b.ckpt.wait()
        w = args.warmup
        return {"step_s": statistics.mean(times[w:]), "step_median_s": _med(times[w:]),
                "blocked_s": _med(blocked[w:]) if blocked else 0.0, "max_step_s": max(times[w:]),
                "warmup_step_s": times[:w]}

    base = loop(False)
    with_ckpt = loop(True)
    if "error" not in with_ckpt:
        with_ckpt["overhead"] = (with_ckpt["step_s"] - base["step_s"]) / base["step_s"]
    return {"step_ms": args.step_ms, "step_kind": args.step_kind, "steps": args.steps, "warmup": args.warmup,
            "no_checkpoint": base, "tierckpt": with_ckpt}


# -- reporting -----------------------------------------------------------------

def _f(x, unit="s"):
    if x is None:
        return "-"
    return f"{x:.3f}" if unit == "s" else f"{x:.2f}x"


def table(report: dict) -> str:
    lines = [f"tierckpt bench: {report['bytes_total']:,} bytes in {report['tensors']} {report['dtype']} tensors "
             f"on {report['device']}; daemon {report['daemon']['build']} "
             f"({'started by the bench' if report['daemon']['started_by_bench'] else report['daemon']['socket']})"]
    if report["mode"] == "train":
        t = report["train"]
        c = t["tierckpt"]
        lines += [f"train: {t['steps']} steps of ~{t['step_ms']} ms ({t['step_kind']}) after {t['warmup']} not counted",
                  f"  no checkpoint   step {t['no_checkpoint']['step_s']:.4f} s",
                  f"  tierckpt/step   error: {c['error']}" if "error" in c else
                  f"  tierckpt/step   step {c['step_s']:.4f} s  blocked {c['blocked_s']:.4f} s"
                  f"  overhead {100 * c['overhead']:.1f}%"]
        return "\n".join(lines)
    fl = report["floor"]
    lines.append(f"floor: {fl['kind']}: save {fl['save_s']:.3f} s (first {fl['first_save_s']:.3f} s), "
                 f"restore {fl['restore_s']:.3f} s")
    lines.append(f"{'save':<24}{'blocked':>9}{'free':>9}{'visible':>9}{'x floor (b/f/v)':>22}"
                 f"{'first: visible':>16}{'x floor':>9}")
    for m, r in report["save"].items():
        if "skipped" in r:
            lines.append(f"{m:<24}skipped: {r['skipped']}")
            continue
        s, q, fr = r["steady"], r["ratio"], r["first"]
        rat = f"{_f(q['blocked'], 'x')}/{_f(q['free'], 'x')}/{_f(q['visible'], 'x')}"
        lines.append(f"{m:<24}{_f(s['blocked_s']):>9}{_f(s['free_s']):>9}{_f(s['visible_s']):>9}{rat:>22}"
                     f"{_f(fr['visible_s']):>16}{_f(r['first_ratio']['visible'], 'x'):>9}")
        if "vs_checkpointer" in r:
            v = r["vs_checkpointer"]
            lines.append(f"{'  x ' + v['of']:<24}{_f(v['blocked'], 'x'):>9}{_f(v['free'], 'x'):>9}"
                         f"{_f(v['visible'], 'x'):>9}  interleaved; rows: {_f(v['rows']['blocked'], 'x')} blocked")
        if "back_to_back" in r:
            bb = r["back_to_back"]
            lines.append(f"{'  back to back':<24}{_f(bb['blocked_s']):>9}{'':>18}{_f(bb['ratio'], 'x'):>22}")
    lines.append(f"{'restore':<24}{'s':>9}{'x floor':>9}{'bitwise':>9}")
    for m, r in report["restore"].items():
        vs = f"  ({_f(r['vs_checkpointer']['s'], 'x')} tierckpt)" if "vs_checkpointer" in r else ""
        lines.append(f"{m:<24}{_f(r['s']):>9}{_f(r['ratio'], 'x'):>9}{str(r['bitwise']):>9}{vs}")
    lines.append("bytes: " + ", ".join(f"{k} {v:,}" for k, v in report["bytes"].items() if v is not None))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tierckpt.bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", required=True, help="bytes of state: 8MB, 1GB, 512MiB, ...")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--mode", choices=("save", "train"), default="save")
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--saves", type=int, default=5, help="steady-state saves per method, after the first")
    p.add_argument("--warmup", type=int, default=3,
                   help="saves per method after the first and before the steady state, not counted")
    p.add_argument("--restores", type=int, default=3)
    p.add_argument("--fresh", choices=("bytes", "all"), default="bytes")
    p.add_argument("--no-prepare", dest="prepare", action="store_false",
                   help="no Checkpointer.prepare() before tierckpt's first save")
    p.add_argument("--step-ms", type=float, default=200.0)
    p.add_argument("--step-kind", choices=("matmul", "sleep"), default="matmul")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--socket", default=None, help="a running daemon (default: $TIERCKPT_SOCKET, else start one)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a new one in /dev/shm)")
    args = p.parse_args(argv)
    try:
        args.size = parse_size(args.size)
    except ValueError as e:
        p.error(str(e))
    for name in ("tensors", "saves", "restores", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.step_ms <= 0:
        p.error(f"--step-ms must be more than 0, got {args.step_ms}")
    torch = _torch()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")

    base = args.workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    workdir = tempfile.mkdtemp(prefix="tierckpt-bench-", dir=base)
    daemon = None
    bench = None
    try:
        daemon = Daemon(args.socket, args.size, workdir)
        bench = Bench(args, workdir, daemon)
        report = {"version": 1, "mode": args.mode, "device": args.device,
                  "card": torch.cuda.get_device_name() if args.device == "cuda" else None,
                  "size": args.size, "bytes_total": bench.bytes, "tensors": len(bench.state),
                  "dtype": DTYPES[args.dtype], "fresh": args.fresh, "torch": torch.__version__, "error": None,
                  "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                  "state_free": "when save() returns (CPU)" if args.device == "cpu" else
                  "Checkpointer.wait_copies(host=True)",
                  "daemon": {"socket": daemon.socket, "started_by_bench": daemon.started,
                             "binary": daemon.binary, "build": daemon.build(),
                             "pid": daemon.proc.pid if daemon.proc is not None else None}}
        if args.mode == "train":
            report["train"] = run_train_mode(bench, args)
            report["bitwise"] = None
            report["error"] = report["train"]["tierckpt"].get("error")
        else:
            report.update(run_save_mode(bench, args))
    except TierckptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if bench is not None:
            bench.close()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report) if args.json else table(report))
    if report.get("error"):
        print(f"error: {report['error']}", file=sys.stderr)
        return 1
    if report.get("bitwise") is False:
        print("error: a restore was not bitwise identical to the state saved: see `bitwise` per restore",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
