"""In-process recovery for PyTorch jobs: when a rank dies, the others keep their processes.

A surviving rank sees the failure as an error of its next collective (gloo
reports a peer's closed connection at once; NCCL hangs until its timeout,
so `run` aborts the communicator as soon as the launcher announces a new
generation). `run` then destroys the broken process group, builds a new one
on a fresh prefix of the same store (the next generation) once the
launcher's replacement for the dead rank has joined, and calls the training
function again in the same process: the model, the optimizer and the
imports stay, and the function's `Checkpointer.load` rolls the state back
to the newest step every rank holds, from this node's memory. Only the
replacement is a new process.

`tierckpt run --nproc-per-node N --restart rank -- python train.py` is the
launcher: it restarts only the failed ranks, gives every rank the store
file (``TIERCKPT_STORE_FILE``) and writes each new generation to
``TIERCKPT_GENERATION_FILE``, which the survivors wait for. Another
launcher may do the same, or start the replacement with
``TIERCKPT_GENERATION`` set to the generation it joins (then the survivors
count generations themselves: one per failure).

With `tierckpt run --spares K` the launcher also keeps K warm spares: the
same command, started ahead without a rank (``TIERCKPT_SPARE_FILE`` set).
A spare runs the script up to `run`, which waits there until the launcher
names the rank it takes over; the replacement then has its interpreter,
imports and model ready. The script must read its rank inside the function
(``recovery.rank``, or ``RANK``, which `run` sets) and give `run` its
Checkpointer, which `run` tells the rank.

Under torchrun (no store file, ``TORCHELASTIC_RESTART_COUNT`` set) `run`
joins torchrun's store, on a prefix of its restart count, and recovers
nothing in process: torchrun's agent restarts every rank, and
``Checkpointer.load`` restores them.

    >>> def train(recovery):
    ...     ckpt.load({"model": model.state_dict(), "optim": opt.state_dict()})
    ...     ...  # the training loop, with collectives
    >>> tierckpt.inprocess.run(train, checkpointer=ckpt)
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass, field

GENERATION_VAR = "TIERCKPT_GENERATION"
GENERATION_FILE_VAR = "TIERCKPT_GENERATION_FILE"
STORE_FILE_VAR = "TIERCKPT_STORE_FILE"
POLICY_VAR = "TIERCKPT_RESTART_POLICY"
SPARE_FILE_VAR = "TIERCKPT_SPARE_FILE"
TORCHRUN_RESTARTS_VAR = "TORCHELASTIC_RESTART_COUNT"
WATCH_EVERY_S = 0.01


@dataclass
class Recovery:
    """What `run` tells the training function about this start of it."""
    generation: int
    """The process group's generation: 0 at the job's start, one more per recovery."""
    in_process: bool
    """True when this process survived a failure and runs the function again."""
    rank: int = 0
    """This process's rank (a warm spare learns it when it takes over a failed rank)."""
    group_at: float = 0.0
    """Wall-clock time (``time.time()``) the process group of this generation formed."""
    error_at: float | None = None
    """Wall-clock time this process caught the failure it recovers from (in process only)."""
    failures: list = field(default_factory=list)
    """(generation, error text, seconds from the error to the new group) of each failure survived."""


def _store(store):
    import torch.distributed as dist
    if store is not None:
        return store
    path = os.environ.get(STORE_FILE_VAR)
    if path:
        return dist.FileStore(path, -1)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent serves a store that outlives its workers; each restart gets a fresh
        # prefix (keys a dead worker left there would send gloo to its old address).
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=60))
    if TORCHRUN_RESTARTS_VAR in os.environ:
        return None  # torchrun's own rendezvous (env://)
    raise ValueError(f"give a store, or set {STORE_FILE_VAR} to a file every rank can open "
                     "(a FileStore that outlives any rank), or launch under `tierckpt run --nproc-per-node` "
                     "or torchrun")


def _announced_generation() -> int | None:
    """The generation the launcher announced in ``TIERCKPT_GENERATION_FILE``, if it keeps one."""
    path = os.environ.get(GENERATION_FILE_VAR)
    if not path:
        return None
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError as e:
        raise ValueError(f"{GENERATION_FILE_VAR} {path}: not a generation number ({e})") from None


class _Watch:
    """Aborts the process group when the launcher announces a newer generation: a collective
    blocked on a dead peer (NCCL waits for its timeout) then fails at once."""

    def __init__(self, generation: int):
        self.generation = generation
        self.moved_on = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        if os.environ.get(GENERATION_FILE_VAR):
            self._thread = threading.Thread(target=self._run, name="tierckpt-generation-watch", daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stop.wait(WATCH_EVERY_S):
            g = _announced_generation()
            if g is not None and g > self.generation:
                self.moved_on.set()
                _abort_group()
                return

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _abort_group():
    """Aborts the default process group's communicators where the backend can (NCCL)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    try:
        if dist.is_initialized() and dist.get_backend() == "nccl" and hasattr(c10d, "_abort_process_group"):
            c10d._abort_process_group()
    except Exception:
        pass  # the collective's own error or timeout still ends it


def _await_rank() -> tuple[int, int]:
    """A warm spare's wait: (rank, generation) once the launcher writes them to ``TIERCKPT_SPARE_FILE``."""
    path = os.environ[SPARE_FILE_VAR]
    while True:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            time.sleep(WATCH_EVERY_S / 2)
            continue
        try:
            rank, generation = (int(x) for x in text.split())
        except ValueError:
            raise ValueError(f"{SPARE_FILE_VAR} {path}: expected 'rank generation', got {text!r}") from None
        return rank, generation


def _next_generation(current: int, timeout_s: float) -> int:
    """The generation to join after a failure: the launcher's next one (waited for), or current+1."""
    if os.environ.get(GENERATION_FILE_VAR) is None:
        return current + 1
    deadline = time.monotonic() + timeout_s
    while True:
        g = _announced_generation()
        if g > current:
            return g
        if time.monotonic() > deadline:
            raise TimeoutError(f"the launcher announced no generation after {current} in "
                               f"{os.environ[GENERATION_FILE_VAR]} within {timeout_s} s")
        time.sleep(WATCH_EVERY_S)


def run(fn, *, checkpointer=None, store=None, backend: str = "gloo", timeout_s: float = 60.0,
        max_failures: int = 10, rank: int | None = None, world_size: int | None = None):
    """Runs ``fn(recovery)`` in a process group, again in this process after a collective fails.

    Returns what `fn` returns. Raises the last error after `max_failures`
    failures, or at once for an error that is not a collective's (a bug in
    `fn` is not retried), or when the launcher restarts every rank anyway
    (``TIERCKPT_RESTART_POLICY=all``, torchrun)."""
    import torch.distributed as dist
    if max_failures < 0:
        raise ValueError(f"max_failures must be at least 0, not {max_failures}")
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    base = _store(store)
    under_torchrun = TORCHRUN_RESTARTS_VAR in os.environ and store is None and not os.environ.get(STORE_FILE_VAR)
    recovers = base is not None and not under_torchrun and os.environ.get(POLICY_VAR, "rank") == "rank"
    generation = int(os.environ.get(GENERATION_VAR) or os.environ.get(TORCHRUN_RESTARTS_VAR) or 0)
    if rank is None and os.environ.get(SPARE_FILE_VAR):
        rank, generation = _await_rank()
        os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
        if checkpointer is not None:
            checkpointer.adopt_rank(rank)
    rank = int(os.environ["RANK"]) if rank is None else rank
    if backend == "nccl":
        import torch
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rec = Recovery(generation=generation, rank=rank, in_process=False)
    timeout = datetime.timedelta(seconds=timeout_s)
    failed_text = None  # the error recovered from
    while True:
        if base is None:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.PrefixStore(f"tierckpt-gen{rec.generation}", base),
                                    rank=rank, world_size=world_size, timeout=timeout)
        rec.group_at = time.time()
        if rec.error_at is not None:
            rec.failures.append((rec.generation, failed_text, rec.group_at - rec.error_at))
        watch = _Watch(rec.generation)
        try:
            return fn(rec)
        except (RuntimeError, dist.DistBackendError) as e:
            peer_gone = watch.moved_on.is_set() or _collective_failure(e)
            if not recovers or not peer_gone or len(rec.failures) >= max_failures:
                raise
            error_at = time.time()
            failed_text = str(e).splitlines()[0] if str(e) else type(e).__name__
        finally:
            watch.stop()
        if backend == "nccl":
            _abort_group()  # a NCCL communicator with a dead peer may hang in destroy
        try:
            dist.destroy_process_group()
        except Exception:
            pass  # the group is broken already; the new one is built on a fresh prefix
        if checkpointer is not None:
            checkpointer.recovering()
        rec = Recovery(generation=_next_generation(rec.generation, timeout_s), rank=rank, in_process=True,
                       error_at=error_at, failures=rec.failures)


def _collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective failing because a peer went away or hung (gloo's wording)."""
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                                   "Broken pipe", "Socket closed", "Connection refused"))
