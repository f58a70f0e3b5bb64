"""`Checkpointer`: save and restore a training job's state through the node daemon."""

from __future__ import annotations

import collections
import mmap
import os
import re
import shutil
import subprocess
import threading
import time
import warnings
import weakref

from . import pins as _pins
from . import completion, preemption, prefault, restore, shard
from .adaptive import Ema, interval_steps, mtbf_from_records
from .client import Client, default_socket
from .errors import CorruptError, NotFoundError, TierckptError, UnavailableError, unsupported_request

DAY = 86400.0

DEFAULTS = {
    "tiered_checkpointing": True,
    "checkpoint_frequency": "adaptive",
    "memory_tier_size": "auto",
    "compression": None,
    "async_save": True,
    "persistent_path": None,
    "persist_every": 1,
    "replication_factor": 1,
    "keep_last": 3,
    "namespace": None,
    "socket": None,
    "mtbf_s": None,
    "persist_mtbf_s": None,
    "min_interval": 10,
    "max_interval": 100_000,
    "preemption_signals": list(preemption.DEFAULT_SIGNALS),
    "preemption_grace_s": 30.0,
    "preemption_exit": True,
}
DEFAULTS.update(_pins.DEFAULTS)  # loss_spike_factor, loss_spike_window, loss_spike_min_steps

_SIZE_RE = re.compile(r"^\s*(auto|\d+(\.\d+)?\s*([KMGT]i?B|B)?)\s*$", re.IGNORECASE)
_NS_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
REFRESH_S = 30.0
HEARTBEAT_MIN_S = 0.1


def _bad(key, value, allowed):
    return ValueError(f"config key {key!r}: {value!r} is not allowed; expected {allowed}")


def _is_int(v):
    return type(v) is int


def _is_num(v):
    return type(v) in (int, float) and v == v and v not in (float("inf"), float("-inf"))


def validate_config(config: dict, nodes: int = 1) -> dict:
    """The config with defaults filled in; ValueError names any unknown key or bad value."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEFAULTS), key=str)
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; allowed keys: {', '.join(DEFAULTS)}")
    c = {**DEFAULTS, **config}
    for key in ("tiered_checkpointing", "async_save"):
        if type(c[key]) is not bool:
            raise _bad(key, c[key], "True or False")
    f = c["checkpoint_frequency"]
    if not (f == "adaptive" or (_is_int(f) and f >= 1)):
        raise _bad("checkpoint_frequency", f, 'a whole number of steps >= 1 or "adaptive"')
    if not (isinstance(c["memory_tier_size"], str) and _SIZE_RE.match(c["memory_tier_size"])):
        raise _bad("memory_tier_size", c["memory_tier_size"], 'a size such as "32GB", "512MiB" or "auto"')
    comp = c["compression"]
    if not (comp is None or comp in ("auto", "off", "lz4", "zstd")
            or (isinstance(comp, str) and re.fullmatch(r"zstd:([1-9]|1[0-9])", comp))):
        raise _bad("compression", comp,
                   'None or "auto" (the daemon\'s default: zstd on 8 cores or more, else off), "off", "lz4", "zstd" '
                   'or "zstd:N" with N in 1..19')
    pp = c["persistent_path"]
    if pp is not None and not (isinstance(pp, str) and re.match(r"^(file|s3|gs|az)://.+", pp)):
        raise _bad("persistent_path", pp, "None or a URL: file:///dir, s3://bucket/prefix, gs://..., az://...")
    for key, lo in (("persist_every", 1), ("keep_last", 1), ("replication_factor", 0),
                    ("min_interval", 1), ("max_interval", 1)):
        if not (_is_int(c[key]) and c[key] >= lo):
            raise _bad(key, c[key], f"a whole number >= {lo}")
    if c["max_interval"] < c["min_interval"]:
        raise _bad("max_interval", c["max_interval"], f"a whole number >= min_interval ({c['min_interval']})")
    for key in ("mtbf_s", "persist_mtbf_s"):
        if c[key] is not None and not (_is_num(c[key]) and c[key] > 0):
            raise _bad(key, c[key], "a positive number of seconds")
    if c["mtbf_s"] is None:
        c["mtbf_s"] = DAY / max(1, nodes)
    if c["persist_mtbf_s"] is None:
        c["persist_mtbf_s"] = 10 * c["mtbf_s"]
    ns = c["namespace"]
    if ns is None:
        ns = os.environ.get("TIERCKPT_NAMESPACE") or "default"
    if not (isinstance(ns, str) and _NS_RE.match(ns)):
        raise _bad("namespace", ns, "1 to 128 characters from [A-Za-z0-9_-]")
    c["namespace"] = ns
    if c["socket"] is not None and not isinstance(c["socket"], str):
        raise _bad("socket", c["socket"], "None or the path of the daemon's Unix socket")
    c["socket"] = c["socket"] or default_socket()
    preemption.validate(c)
    _pins.validate_config(c)
    return c


def _dist():
    """torch.distributed if torch is imported and a process group is initialized."""
    import sys
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        d = torch.distributed
        return d if d.is_available() and d.is_initialized() else None
    except Exception:
        return None


def _rank_world(rank, world_size):
    d = _dist()
    if d is not None:
        return (d.get_rank() if rank is None else rank), (d.get_world_size() if world_size is None else world_size)
    r = int(os.environ.get("RANK", 0)) if rank is None else rank
    w = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    return r, w


def _partial(e: CorruptError, names, step) -> CorruptError:
    """`e`, saying which tensors of the caller's state were filled in part (`e.partial`)."""
    e.partial = sorted(names)
    if names:
        shown = ", ".join(e.partial[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        e.message = (f"{e.message}; the tensors of `state` filled in place hold verified bytes of step {step} "
                     f"in part, not a consistent state, do not train from them: {shown}")
        e.args = (e.message,)
    return e


class _Segment:
    """A cached writable mapping of one of the daemon's segment files, page-locked for CUDA on first
    use (once per mapping) and unregistered before it is unmapped."""

    def __init__(self, fd, mm, length, path):
        self.fd, self.mm, self.length, self.path = fd, mm, length, path
        self._u8 = None
        self.registered = False
        self.events: list = []  # copies into it in flight

    def tensor(self):
        """The whole mapping as a uint8 tensor (one buffer export, kept while mapped)."""
        if self._u8 is None:
            import torch
            self._u8 = torch.frombuffer(self.mm, dtype=torch.uint8)
        return self._u8

    def register(self) -> None:
        if not self.registered:
            from . import cuda
            self.registered = cuda.register(self.tensor().data_ptr(), self.length, what=f"segment {self.path}")

    def close(self) -> None:
        for ev in self.events:
            try:
                ev.synchronize()  # never unmap under a DMA
            except Exception:
                pass
        self.events = []
        if self.registered:
            from . import cuda
            cuda.unregister(self._u8.data_ptr(), what=f"segment {self.path}")
            self.registered = False
        self._u8 = None
        try:
            self.mm.close()
        except BufferError:
            pass
        os.close(self.fd)


class _SealJob:
    __slots__ = ("res_id", "step", "events")

    def __init__(self, res_id, step, events):
        self.res_id, self.step, self.events = res_id, step, events


def _wait_copies(events) -> None:
    """Blocks until the device-to-host copies behind `events` are done (raises their CUDA error)."""
    for _, ev in events:
        ev.synchronize()


class _Sealer:
    """Seals reservations, in order, once their copies are done, on a thread of its own. It seals on
    the Checkpointer's connection (the one that reserved), so a trainer that dies first leaves
    nothing visible: the daemon reclaims the reservations of a closed connection. A failed copy or
    seal aborts the reservation and is kept for `wait()`."""

    def __init__(self, client: Client):
        self._client = client
        self._queue: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._busy = 0
        self._errors: list = []
        self._peeked = 0
        self._thread = None
        self._stopped = False

    def submit(self, job: _SealJob) -> None:
        with self._cv:
            self._queue.append(job)
            self._busy += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tierckpt-sealer", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def seal(self, job: _SealJob, wait: bool) -> None:
        try:
            _wait_copies(job.events)
            self._client.seal(job.res_id, wait=wait)
        except BaseException as e:
            try:
                self._client.abort(job.res_id)
            except Exception:
                pass
            with self._cv:
                self._errors.append((job.step, e))
            if not isinstance(e, Exception):
                raise

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopped:
                    self._cv.wait()
                if not self._queue:
                    return
                job = self._queue[0]
            try:
                self.seal(job, wait=False)
            finally:
                with self._cv:
                    self._queue.popleft()
                    self._busy -= 1
                    self._cv.notify_all()

    def flush(self, timeout_s: float = 600.0) -> bool:
        """Waits until every submitted job is sealed or failed; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def peek_errors(self) -> list:
        """Errors not seen by peek_errors before (they stay for take_errors)."""
        with self._cv:
            new, self._peeked = self._errors[self._peeked:], len(self._errors)
        return new

    def take_errors(self) -> list:
        with self._cv:
            errors, self._errors, self._peeked = self._errors, [], 0
        return errors

    def stop(self, timeout_s: float = 60.0) -> None:
        """Seals what was submitted (at close and at exit), then ends the thread."""
        self.flush(timeout_s)
        with self._cv:
            self._stopped = True
            self._cv.notify_all()


def _finalize(sealer: _Sealer, maps: dict) -> None:
    """Seals what was submitted, then unregisters and unmaps every cached segment (at close, at exit,
    or when a Checkpointer is dropped unclosed: never leave memory page-locked behind)."""
    sealer.stop()
    for k in list(maps):
        maps.pop(k).close()


class Checkpointer:
    """Saves each rank's state into the node daemon's memory tier and restores it.

    >>> ckpt = Checkpointer({"checkpoint_frequency": "adaptive", "async_save": True})
    >>> restored = ckpt.load({"model": model.state_dict(), "optim": opt.state_dict()})
    >>> for step in range(start, steps):
    ...     train_step()
    ...     if ckpt.should_save(step):
    ...         ckpt.save(step, {"model": model.state_dict(), "optim": opt.state_dict()})
    """

    def __init__(self, config: dict | None = None, rank: int | None = None, world_size: int | None = None):
        self.rank, self.world_size = _rank_world(rank, world_size)
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size) or 1)
        self.config = validate_config(config or {}, nodes=max(1, self.world_size // max(1, local)))
        if not self.config["tiered_checkpointing"]:
            raise ValueError("config key 'tiered_checkpointing': False is not supported yet; this "
                             "Checkpointer saves through the node daemon's memory tier (True)")
        self.namespace = self.config["namespace"]
        self.socket = self.config["socket"]
        self._client = self._connect()
        self._maps: dict = {}  # (dev, ino, pages) -> _Segment: pooled segments stay mapped
        self._prepared = None  # (path, pages) set aside by prepare()
        self._preparing = None  # the thread mapping it
        self._maps_generation = self._client.generation
        self._sealer = _Sealer(self._client)
        self._closer = weakref.finalize(self, _finalize, self._sealer, self._maps)  # also at exit, or if dropped
        self._attached = 0
        self._last_events: list = []
        self._pending: list[int] = []
        self._discarded = False
        self._lock = threading.Lock()
        # measurements for the adaptive interval
        self._cost = Ema()          # seconds the trainer was blocked per save
        self._step_time = Ema()     # seconds per training step, saves excluded
        self._last_call = None      # (monotonic time, blocked seconds seen since)
        self._blocked_since_call = 0.0
        self._next_save = None
        self._next_persist = None
        self._last_save_step = None
        self._failures_cache = (float("-inf"), [])
        self._status_cache = (float("-inf"), None)
        self._failures_supported = True
        self._persist_probe = None  # (step, save time) waiting for a commit
        self._persist_cost = Ema()
        self.last_intervals: dict = {}
        self._hb_path = os.environ.get("TIERCKPT_HEARTBEAT_FILE") or None
        self._hb_last = 0.0
        self._preemption = preemption.Watch(self)
        self._completion = completion.Completion()

    @property
    def preempted(self) -> bool:
        """True once the step saved for a preemption is safe (with ``preemption_exit`` off; with it on,
        the save exits the process with `preemption.EXIT_PREEMPTED` instead)."""
        return self._preemption.preempted

    def _agree(self) -> int:
        """The one all-reduce (max) per `should_save` of a multi-rank job, so collective like
        `intervals()`: the preemption's request, which every rank must answer at the same step, and a
        round of the job's completion (`completion.py`). Returns the request agreed."""
        want = self._preemption.wants()
        d = self._dist_group()
        if d is None:
            return want
        vals = preemption.all_max(d, [want] + self._completion.local(self))
        self._completion.agreed(self, vals[1:])
        return int(vals[0])

    def _dist_group(self):
        """torch.distributed when this is one rank of several in a process group, else None."""
        d = _dist()
        return d if d is not None and self.world_size > 1 else None

    # -- daemon -------------------------------------------------------------
    def _connect(self) -> Client:
        try:
            return Client(self.socket)
        except UnavailableError:
            self._start_daemon()
            return Client(self.socket)

    def _start_daemon(self) -> None:
        """Starts a detached `tierckptd` for this node (it must outlive the trainer)."""
        exe = os.environ.get("TIERCKPT_DAEMON_BIN") or shutil.which("tierckptd")
        if not exe:
            raise UnavailableError(
                f"no tierckpt daemon answers on {self.socket} and `tierckptd` is not on PATH "
                "(nor TIERCKPT_DAEMON_BIN set); start one with `tierckptd --socket "
                f"{self.socket}` or run the job under `tierckpt run -- <command>`")
        c = self.config
        sock_dir = os.path.dirname(os.path.abspath(self.socket))
        args = [exe, "--socket", self.socket, "--memory-tier-size", c["memory_tier_size"].strip(),
                "--keep-last", str(c["keep_last"])]
        if "TIERCKPT_MEMORY_DIR" not in os.environ and os.path.basename(self.socket) == "daemon.sock":
            args += ["--memory-dir", sock_dir]
        if c["persistent_path"]:
            args += ["--persistent-path", c["persistent_path"], "--persist-every", str(c["persist_every"])]
            if c["compression"] is not None:
                args += ["--persist-compression", c["compression"]]
        if os.environ.get("TIERCKPT_NODES"):
            args += ["--replication-factor", str(c["replication_factor"])]
        os.makedirs(sock_dir, exist_ok=True)
        log = open(os.path.join(sock_dir, "tierckptd.log"), "ab")
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, close_fds=True)
        finally:
            log.close()
        deadline = time.monotonic() + 30
        exited_at = None
        while time.monotonic() < deadline:
            try:
                Client(self.socket).close()
                return
            except UnavailableError:
                pass
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
            # it may have lost the directory lock to another rank's daemon: give that one 5 s
            if exited_at is not None and time.monotonic() - exited_at > 5:
                raise UnavailableError(
                    f"started {' '.join(args)} but it exited with status {proc.returncode} and nothing "
                    f"answers on {self.socket}; see {os.path.join(sock_dir, 'tierckptd.log')}")
            time.sleep(0.05)
        raise UnavailableError(f"started tierckptd but nothing answers on {self.socket} after 30 s")

    @property
    def client(self) -> Client:
        return self._client

    # -- heartbeat ----------------------------------------------------------
    def heartbeat(self, step: int | None = None) -> None:
        if not self._hb_path:
            return
        now = time.monotonic()
        if now - self._hb_last < HEARTBEAT_MIN_S:
            return
        self._hb_last = now
        try:
            with open(self._hb_path, "w") as f:
                f.write(f"{'' if step is None else int(step)}\n")
        except OSError:
            pass

    # -- save ---------------------------------------------------------------
    def _segment(self, path: str, length: int) -> _Segment:
        """A writable mapping of a reserved segment, cached by (device, inode, pages spanned); a
        new connection (the daemon restarted) drops every cached mapping and its registration."""
        if self._maps_generation != self._client.generation:
            self._drop_segments()
            self._maps_generation = self._client.generation
        fd = os.open(path, os.O_RDWR)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, prefault.pages(length))
        for k in [k for k, g in self._maps.items() if k != key and os.fstat(g.fd).st_nlink == 0]:
            self._maps.pop(k).close()  # deleted segments: do not pin their memory
        if key in self._maps:
            if self._maps[key].length >= length:
                os.close(fd)
                return self._maps[key]
            self._maps.pop(key).close()  # a shorter mapping within the same pages: map it again
        try:
            if st.st_size != length:
                raise TierckptError(f"segment {path} has {st.st_size} bytes, expected {length}")
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return self._cache_segment(key, _Segment(fd, mm, length, path))

    def _cache_segment(self, key, seg: _Segment) -> _Segment:
        while len(self._maps) >= 8:
            self._maps.pop(next(iter(self._maps))).close()
        self._maps[key] = seg
        return seg

    def prepare(self, state, step: int | None = None) -> None:
        """Gets the next save of a state shaped like `state` ready: the daemon sets a free segment
        of its size aside, and a background thread maps it and faults it in here, so that the first
        save copies at memory speed instead of paying page faults and page tables (~0.15-3 s/GiB).
        Call it once before training, after `load()`, or whenever the state's shapes change. A
        hint: when the daemon has no room to set one aside, nothing happens."""
        if step is None:
            step = 0 if self._last_save_step is None else self._last_save_step + 1
        _, _, length = self._plan(step, state)
        want = prefault.pages(length) * prefault.PAGE
        self._join_prepare()
        try:
            got = self._client.prepare(want)
        except TierckptError as e:
            warnings.warn(f"prepare(): no segment set aside ({e}); the next save maps a new one", stacklevel=2)
            return
        if self._maps_generation != self._client.generation:
            self._drop_segments()
            self._maps_generation = self._client.generation
        self._prepared = (got["path"], prefault.pages(want))
        done: dict = {}

        def run():
            try:
                fd, mm = prefault.map_populated(got["path"], want)
                st = os.fstat(fd)
                done["seg"] = ((st.st_dev, st.st_ino, prefault.pages(want)), _Segment(fd, mm, want, got["path"]))
            except Exception as e:  # a hint: the save maps its segment itself
                done["error"] = e

        t = threading.Thread(target=run, name="tierckpt-prepare", daemon=True)
        t.start()
        self._preparing = (t, done)

    def _join_prepare(self) -> None:
        """Waits for `prepare()`'s mapping and caches it."""
        if self._preparing is None:
            return
        t, done = self._preparing
        self._preparing = None
        t.join()
        if "seg" in done:
            key, seg = done["seg"]
            old = self._maps.pop(key, None)
            if old is not None:
                old.close()
            self._cache_segment(key, seg)

    def _drop_segments(self) -> None:
        for k in list(self._maps):
            self._maps.pop(k).close()

    def _reserve(self, step: int, length: int) -> dict:
        c = self._client
        gen = c.generation
        self._join_prepare()
        hint, self._prepared = self._prepared, None
        segment = hint[0] if hint and hint[1] == prefault.pages(length) else None
        try:
            return c.reserve(self.namespace, step, self.rank, self.world_size, length, segment)
        except UnavailableError:
            if c.connected or c.generation != gen:
                raise
            # the connection broke (the daemon restarted?): one try on a new one
            return c.reserve(self.namespace, step, self.rank, self.world_size, length)

    def _plan(self, step: int, state, tiers=None):
        """`state` encoded as the shard of `step`: (tensors, header, file length)."""
        tree, tensors = shard.encode_tree(state)
        import json
        meta = {"format": shard.FORMAT, "step": str(step), "tree": json.dumps(tree, separators=(",", ":"))}
        if tiers:
            meta["tiers"] = ",".join(sorted(tiers))
        header, length = shard.plan(tensors, meta)
        return tensors, header, length

    def save(self, step: int, state, tiers=None) -> None:
        """Copies `state` into a segment of the daemon and has it sealed.

        CPU tensors are copied before this returns. CUDA tensors are copied
        on a side stream per device straight into the (page-locked) segment:
        `save` returns once the copies are enqueued, and a background thread
        seals the shard when they complete. The state may change again only
        after its copy: by default each device's current stream waits for
        the copy (a GPU-side wait, nothing blocks here); after
        `attach(optimizer)` only the optimizer's step waits, so the copy
        overlaps the next forward and backward pass. With `async_save` the
        seal, too, is left to that thread (CPU-only states included) and the
        daemon checksums and publishes the shard in the background (see
        `wait()`); without it, `save` returns once the step is visible. A
        copy or seal that fails in the background aborts its shard: `wait()`
        raises it, the next `save()` warns.
        """
        t0 = time.perf_counter()
        self.heartbeat(step)
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be a whole number >= 0, got {step!r}")
        if not self._closer.alive:
            raise TierckptError(f"save({step}) after close(): this Checkpointer no longer seals; make a new one")
        self._warn_failed_seals()
        tensors, header, length = self._plan(step, state, tiers)
        host = [t for t in tensors if t.kind == "numpy" or t.value.device.type == "cpu"]
        dev = [t for t in tensors if t.kind == "torch" and t.value.device.type == "cuda"]
        res = self._reserve(step, length)
        c = self._client
        try:
            seg = self._segment(res["path"], length)
            shard.write(seg.mm, header, host)
            events = self._copy_to_segment(seg, dev) if dev else []
        except BaseException as e:
            try:
                c.abort(res["id"])
            except Exception:
                pass
            if dev and not isinstance(e, (TierckptError, KeyboardInterrupt)):
                raise TierckptError(f"step {step} rank {self.rank}: copying the state into the daemon's "
                                    f"segment failed: {e}; the shard was aborted, earlier steps are intact") from e
            raise
        job = _SealJob(res["id"], step, events)
        if self.config["async_save"]:
            self._sealer.submit(job)
        else:
            self._sealer.seal(job, wait=True)
            self._raise_failed_seals()
        self._pending.append(step)
        del self._pending[:-16]
        blocked = time.perf_counter() - t0
        self.last_save_blocked_s = blocked
        self._cost.add(blocked)
        self._blocked_since_call += blocked
        self._last_save_step = step
        if self._persist_probe is None and self._persistent_status() is not None:
            self._persist_probe = (step, time.time())
        self._preemption.after_save(step)

    def _copy_to_segment(self, seg: _Segment, refs: list) -> list:
        """Enqueues device-to-host copies of CUDA tensors into `seg`; one event per device."""
        import torch

        from . import cuda
        seg.register()
        dst = seg.tensor()
        by_dev: dict = {}
        for r in refs:
            by_dev.setdefault(r.value.device, []).append(r)
        events, used = [], []
        try:
            for device, rs in by_dev.items():
                side = cuda.side_stream(device)
                used.append(side)
                cur = torch.cuda.current_stream(device)
                side.wait_stream(cur)  # the values the trainer has computed so far
                with torch.cuda.device(device), torch.cuda.stream(side), torch.no_grad():
                    for r in rs:
                        if r.nbytes == 0:
                            continue
                        v = r.value.detach()
                        v.record_stream(side)  # its memory is not reused before the copy ran
                        if not v.is_contiguous():
                            v = v.contiguous()  # allocated on the side stream, freed there after the copy
                        dst[r.offset:r.offset + r.nbytes].copy_(v.reshape(-1).view(torch.uint8),
                                                                non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(side)
                events.append((device, ev))
        except BaseException:
            for side in used:  # no copy may still run into a segment given back to the daemon
                try:
                    side.synchronize()
                except Exception:
                    pass
            raise
        if not self._attached:
            for device, ev in events:
                # nothing on the trainer's stream changes the state before the copy (a GPU-side wait)
                torch.cuda.current_stream(device).wait_event(ev)
        seg.events = [ev for _, ev in events]
        self._last_events = events
        return events

    def attach(self, optimizer):
        """Makes `optimizer.step()` wait (on the GPU) for the last save's copies, instead of every
        kernel after a save: the copies then overlap the next forward and backward pass. State the
        forward pass changes (BatchNorm running statistics) needs `wait_copies()` before it too.
        Returns the hook's handle (`.remove()` detaches)."""
        ref = weakref.ref(self)

        def hook(_opt, _args, _kwargs):
            me = ref()
            if me is not None:
                me.wait_copies()

        handle = optimizer.register_step_pre_hook(hook)
        self._attached += 1
        me = ref

        class _Handle:
            """The hook's handle; `remove()` also restores the wait after every save."""

            def remove(self):
                handle.remove()
                c = me()
                if c is not None:
                    c._attached = max(0, c._attached - 1)

        return _Handle()

    def wait_copies(self, host: bool = False) -> None:
        """Makes each device's current stream wait for the last save's copies (GPU-side, no host
        synchronisation), or with `host=True` blocks until they are done (then the state may change
        from anywhere); a no-op without CUDA tensors."""
        if not self._last_events:
            return
        import torch
        for device, ev in self._last_events:
            if host:
                ev.synchronize()
            else:
                torch.cuda.current_stream(device).wait_event(ev)

    def _warn_failed_seals(self) -> None:
        for step, e in self._sealer.peek_errors():
            warnings.warn(f"tierckpt: step {step} rank {self.rank} of {self.namespace!r} was not saved: {e}",
                          RuntimeWarning, stacklevel=3)

    def _raise_failed_seals(self) -> None:
        errors = self._sealer.take_errors()
        if errors:
            for step, _ in errors:
                if step in self._pending:
                    self._pending.remove(step)
            msg = "; ".join(f"step {s} was not saved: {e}" for s, e in errors)
            raise TierckptError(f"rank {self.rank} of {self.namespace!r}: {msg} (the shard was aborted; "
                                "earlier steps are intact)") from errors[-1][1]

    def wait(self, timeout_s: float = 600.0) -> None:
        """Waits until every shard saved so far is sealed and visible (checksummed and published);
        raises for a step whose copy or seal failed."""
        if not self._sealer.flush(timeout_s):
            raise TierckptError(f"rank {self.rank} of {self.namespace!r}: the copies of steps {self._pending} "
                                f"were not all sealed after {timeout_s} s")
        self._raise_failed_seals()
        while self._pending:
            try:
                self._client.wait_visible(self.namespace, self._pending[0], self.rank, int(timeout_s * 1000))
            except NotFoundError:
                if len(self._pending) == 1:
                    raise
                # an older step already visible and dropped by retention since
            self._pending.pop(0)

    # -- load ---------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._client.latest(self.namespace)

    def load(self, state=None, step: int | str | None = None):
        """Restores the newest complete step (or `step`, a number or the name of a pinned step such
        as "best" or "pre-spike-1200") and returns the restored tree.

        Tensors of `state` at the same path, with the same shape and dtype, are
        filled in place (and appear in the returned tree); others come back as
        new CPU tensors. Returns None when the namespace has no complete step.
        Every chunk is verified before a byte is used; a corrupt copy is
        reported to the daemon and the load is tried once more (the daemon
        falls through to a peer or the persistent tier), else CorruptError.
        DTensors are saved as each rank's local chunk; a DTensor of `state`
        gets its local chunk filled from every saved chunk that overlaps it,
        read from the other ranks' shards where needed, so a step saved on N
        ranks loads on M (a plain tensor of the global shape, or none, gets
        the whole tensor).
        """
        if isinstance(step, str):
            step = _pins.resolve(self._client, self.namespace, step)
        self.heartbeat(step)
        self.wait()  # this Checkpointer's own saves first
        if step is None:
            step = self._agreed_latest()
            if step is None:
                self._after_resume(None)
                return None
        world = self._saved_world(step)
        # a rank the saving job did not have reads the plain values of rank (rank % its world size)
        src = self.rank if world is None or self.rank < world else self.rank % world
        # a shard another writer sealed asynchronously may still be checksumming
        try:
            self._client.wait_visible(self.namespace, step, src, 60_000)
        except NotFoundError:
            pass  # not in this node's memory: open() looks in the other tiers
        try:
            out, reshard = self._load_shard(state, step, src)
        except CorruptError as e:
            raise _partial(e, getattr(e, "partial", ()), step) from None
        if reshard is not None:  # DTensors whose chunks lie (also) in other ranks' shards
            reshard.fill(self._client, self.namespace, step, world or self.world_size, src)
        self._after_resume(step)
        return out

    def _saved_world(self, step):
        """The world size the step was saved with (None when the daemon does not list it)."""
        try:
            for s in self._client.list_steps(self.namespace):
                if s.get("step") == step:
                    return int(s["world_size"])
        except (TierckptError, KeyError, TypeError, ValueError):
            pass
        return None

    def recovering(self) -> None:
        """Prepares this Checkpointer for a load after in-process recovery (`tierckpt.inprocess`):
        its own saves are finished first, and the next load discards again the steps newer than
        the one it restores (the dead rank's step left incomplete, this rank's after it)."""
        try:
            self.wait()
        except Exception:
            pass  # a save that failed with the group is dropped by the discard
        self._discarded = False
        self._next_save = None

    def adopt_rank(self, rank: int) -> None:
        """Makes this Checkpointer, built by a warm spare before it had a rank, save and load as
        `rank` (`tierckpt.inprocess` calls it when the launcher gives the spare a failed rank)."""
        if self._pending:
            raise TierckptError(f"a Checkpointer that saved as rank {self.rank} cannot become rank {rank}")
        if not (0 <= rank < self.world_size):
            raise ValueError(f"rank {rank} is not below world_size {self.world_size}")
        self.rank = rank

    def _agreed_latest(self):
        """The newest complete step, the same on every rank. The daemon's `latest` waits for
        seals in flight (a dead incarnation's may be finishing) before it answers."""
        d = _dist()
        if d is None or self.world_size == 1 or self.rank == 0:
            step = self.latest_step()
        else:
            step = None
        if d is not None and self.world_size > 1:
            import torch
            t = torch.tensor([-1 if step is None else step], dtype=torch.int64)
            d.broadcast(t, src=0)
            step = None if t.item() < 0 else int(t.item())
        return step

    def _after_resume(self, step):
        if not self._discarded:
            self._client.discard_incomplete_after(self.namespace, step if step is not None else 0)
            self._discarded = True
            d = _dist()
            if d is not None:
                d.barrier()
        if step is not None:
            self._last_save_step = step
            self._next_save = None

    def _load_shard(self, state, step, rank):
        """Shard `rank` of `step`, verified (one more copy tried when corrupt): (the restored tree, a
        `Reshard` of the DTensors still to fill from other ranks, or None)."""
        import json
        reshard = None

        def build(entries, meta, data_start, plan):
            nonlocal reshard
            reshard = None  # each copy tried plans afresh
            if meta.get("format") != shard.FORMAT:
                raise TierckptError(f"step {step} rank {rank} of {self.namespace!r} was not written by "
                                    f"the Python Checkpointer (format {meta.get('format')!r}); "
                                    "read it with the safetensors package")

            def make(kind, name, tgt):
                nonlocal reshard
                if kind == "dtensor":
                    if reshard is None:
                        from .torch.dtensor import Reshard
                        reshard = Reshard()
                    return reshard.target(plan, entries, data_start, name, tgt)
                e = entries[name]
                a, b = e["data_offsets"]
                return restore.target(plan, name, data_start + a, b - a, kind, e["dtype"], e["shape"], tgt)

            return shard.decode_tree(json.loads(meta["tree"]), make, state)

        out = restore.load_shard(self._client, self.namespace, step, rank, build)
        return out, reshard

    # -- when to save -------------------------------------------------------
    def should_save(self, step: int) -> set:
        """Tiers to save `step` to: an empty set means do not save. Call it every step."""
        self.heartbeat(step)
        now = time.monotonic()
        if self._last_call is not None:
            dt = now - self._last_call - self._blocked_since_call
            if dt > 0:
                self._step_time.add(dt)
        self._last_call = now
        self._blocked_since_call = 0.0
        asked = self._preemption.tiers(step, self._agree())
        if asked is not None:
            return asked
        f = self.config["checkpoint_frequency"]
        persist = self._persistent_status() is not None
        if f != "adaptive":
            if step % f != 0:
                return set()
            tiers = {"memory"}
            if persist and (step // f) % self.config["persist_every"] == 0:
                tiers.add("persistent")
            return tiers
        if self._next_save is None:
            base = self._last_save_step if self._last_save_step is not None else 0
            self._next_save = base + self.config["min_interval"]
            self._next_persist = self._next_save
        if step < self._next_save:
            return set()
        iv = self.intervals()  # collective across ranks: every rank is at this same step
        self._next_save = step + iv["memory"]
        tiers = {"memory"}
        if "persistent" in iv and step >= self._next_persist:
            tiers.add("persistent")
            self._next_persist = step + iv["persistent"]
        return tiers

    def _failures(self) -> list:
        t, recs = self._failures_cache
        if time.monotonic() - t < REFRESH_S or not self._failures_supported:
            return recs
        try:
            recs = self._client.failures(self.namespace)
        except TierckptError as e:
            if unsupported_request(e):
                self._failures_supported = False  # an older daemon
            recs = []
        self._failures_cache = (time.monotonic(), recs)
        return recs

    def _persistent_status(self):
        t, st = self._status_cache
        if time.monotonic() - t < REFRESH_S:
            return st
        try:
            st = (self._client.status() or {}).get("persistent")
        except TierckptError:
            st = None
        self._status_cache = (time.monotonic(), st)
        if st is not None and self._persist_probe is not None:
            step, t_saved = self._persist_probe
            for ns in st.get("namespaces", []):
                if ns.get("namespace") == self.namespace:
                    upload = ns.get("last_upload_s")  # exposed by newer daemons
                    if upload is not None:
                        self._persist_cost.add(float(upload))
                        self._persist_probe = None
                    elif ns.get("last_committed") is not None and ns["last_committed"] >= step:
                        # an upper bound: commit observed at this refresh
                        self._persist_cost.add(time.time() - t_saved)
                        self._persist_probe = None
        return st

    def intervals(self) -> dict:
        """The current intervals in steps per tier, and the figures they come from.

        In a multi-rank job this is collective: every rank must call it at the
        same step (should_save does); measurements are all-reduced (max).
        """
        c = self.config
        now = time.time()
        recs = self._failures()
        mtbf = mtbf_from_records(c["mtbf_s"], recs, now)
        pmtbf = mtbf_from_records(c["persist_mtbf_s"], recs, now) if recs else c["persist_mtbf_s"]
        persist = self._persistent_status() is not None
        vals = [self._cost.value, self._step_time.value, self._persist_cost.value]
        vals = [-1.0 if v is None else float(v) for v in vals] + [-mtbf, -pmtbf, 1.0 if persist else 0.0]
        d = _dist()
        if d is not None and self.world_size > 1:
            import torch
            t = torch.tensor(vals, dtype=torch.float64)
            d.all_reduce(t, op=d.ReduceOp.MAX)
            vals = t.tolist()
        cost, step_time, pcost = (None if v < 0 else v for v in vals[:3])
        mtbf, pmtbf, persist = -vals[3], -vals[4], vals[5] > 0
        out = {"memory": interval_steps(cost, mtbf, step_time, c["min_interval"], c["max_interval"]),
               "cost_s": cost, "step_time_s": step_time, "mtbf_s": mtbf}
        if persist:
            pc = pcost if pcost is not None else cost
            out["persistent"] = max(out["memory"], interval_steps(pc, pmtbf, step_time, c["min_interval"],
                                                                  c["max_interval"]))
            out["persist_cost_s"], out["persist_mtbf_s"] = pc, pmtbf
        self.last_intervals = out
        return out

    def close(self) -> None:
        """Seals what was saved (waiting for pending copies), unregisters and unmaps the segments and
        closes the connection. A save that failed in the background is reported as a warning."""
        self._preemption.close()
        self._closer()
        self._warn_failed_seals()
        self._join_prepare()
        self._drop_segments()
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- pinned and named steps, training signals (issue 19; see tierckpt.pins) ----
    def pin(self, step: int, name: str | None = None) -> dict:
        """Keeps `step` from retention on every tier that holds it (this node's memory, the peers'
        copies, the persistent tier), optionally naming it; a name on another step moves here.
        Returns the daemon's answer: `{"pin": {"step", "names", "tiers"}, "not_reached": [...]}`."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"pin: step must be a whole number >= 0, got {step!r}")
        if name is not None:
            _pins.validate_name(name)
        return self._client.pin(self.namespace, step, name)

    def unpin(self, step: int | None = None, name: str | None = None) -> dict:
        """Makes a pinned step, given by number or by name (exactly one), ordinary again."""
        if name is not None:
            _pins.validate_name(name)
        return self._client.unpin(self.namespace, step, name)

    def pins(self) -> list:
        """The pinned steps of this job's namespace: `[{"step", "names", "tiers"}]`."""
        return self._client.pins(self.namespace)

    def observe(self, step: int, loss) -> bool:
        """Feeds the loss of `step` to the spike rule; returns whether it is a spike.

        A loss above `loss_spike_factor` times the moving average of the `loss_spike_window`
        losses before it (judged once `loss_spike_min_steps` were observed), or one that is not
        finite, is a spike: the newest step saved (by this rank, or complete here) at or before
        the previous observed step is pinned as `pre-spike-<step>`, and so kept from retention until
        unpinned: rank 0 pins it on every tier and member, every other rank on its own node only
        (every rank calls observe, so every node pins its copies without a forward per rank). A
        spike right after another that would pin the same step pins nothing more. Steps must grow
        from call to call."""
        w = getattr(self, "_spikes", None)
        if w is None:
            c = self.config
            w = self._spikes = _pins.SpikeWatch(c["loss_spike_factor"], c["loss_spike_window"],
                                                c["loss_spike_min_steps"])
        before = w.prev_step if w.prev_step is not None else step - 1 if _is_int(step) else None
        if not w.observe(step, loss):
            return False
        self.wait()  # this Checkpointer's own saves visible first
        target = _pins.pre_spike_step(self._client.list_steps(self.namespace), before, self.rank)
        if target is None:
            warnings.warn(f"loss spike at step {step}: no complete step at or before {before} to pin")
        elif target != getattr(self, "_spike_pinned", None):
            self._client.pin(self.namespace, target, f"pre-spike-{step}", node_only=self.rank != 0)
            self._spike_pinned = target
        return True
