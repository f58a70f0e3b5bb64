"""In-process recovery for PyTorch jobs: when a rank dies, the others keep their processes.

A surviving rank sees the failure as an error of its next collective (gloo
reports a peer's closed connection at once; set the process group timeout
for hangs). `run` then destroys the broken process group, builds a new one
on a fresh prefix of the same store (generation n+1) once the launcher's
replacement for the dead rank has joined, and calls the training function
again in the same process: the model, the optimizer and the imports stay,
and the function's `Checkpointer.load` rolls the state back to the newest
step every rank holds, from this node's memory. Only the replacement is a
new process; the launcher starts it with ``TIERCKPT_GENERATION`` set to the
generation it joins (the number of ranks it restarted so far).

The store must outlive any rank: a ``torch.distributed.FileStore`` on a
shared file (``TIERCKPT_STORE_FILE``, e.g. on the node's tmpfs), or any store
the caller gives.

    >>> def train(recovery):
    ...     ckpt.load({"model": model.state_dict(), "optim": opt.state_dict()})
    ...     ...  # the training loop, with collectives
    >>> tierckpt.inprocess.run(train, checkpointer=ckpt)
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field

GENERATION_VAR = "TIERCKPT_GENERATION"
STORE_FILE_VAR = "TIERCKPT_STORE_FILE"


@dataclass
class Recovery:
    """What `run` tells the training function about this start of it."""
    generation: int
    """The process group's generation: 0 at the job's start, +1 per rank restarted."""
    in_process: bool
    """True when this process survived a failure and runs the function again."""
    failures: list = field(default_factory=list)
    """(generation, error text, seconds from the error to the new group) of each failure survived."""


def _store(store):
    import torch.distributed as dist
    if store is not None:
        return store
    path = os.environ.get(STORE_FILE_VAR)
    if not path:
        raise ValueError(f"give a store, or set {STORE_FILE_VAR} to a file every rank can open "
                         "(a FileStore that outlives any rank)")
    return dist.FileStore(path, -1)


def run(fn, *, checkpointer=None, store=None, backend: str = "gloo", timeout_s: float = 60.0,
        max_failures: int = 10, rank: int | None = None, world_size: int | None = None):
    """Runs ``fn(recovery)`` in a process group, again in this process after a collective fails.

    Returns what `fn` returns. Raises the last error after `max_failures`
    failures, or at once for an error that is not a collective's (a bug in
    `fn` is not retried)."""
    import torch.distributed as dist
    if max_failures < 0:
        raise ValueError(f"max_failures must be at least 0, not {max_failures}")
    rank = int(os.environ["RANK"]) if rank is None else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    base = _store(store)
    generation = int(os.environ.get(GENERATION_VAR, "0"))
    rec = Recovery(generation=generation, in_process=False)
    timeout = datetime.timedelta(seconds=timeout_s)
    failed = None  # (when, error text) of the failure being recovered from
    while True:
        dist.init_process_group(backend, store=dist.PrefixStore(f"tierckpt-gen{rec.generation}", base),
                                rank=rank, world_size=world_size, timeout=timeout)
        if failed is not None:
            rec.failures.append((rec.generation, failed[1], time.monotonic() - failed[0]))
        try:
            return fn(rec)
        except (RuntimeError, dist.DistBackendError) as e:
            if not _collective_failure(e) or len(rec.failures) >= max_failures:
                raise
            failed = (time.monotonic(), str(e).splitlines()[0])
            dist.destroy_process_group()
            if checkpointer is not None:
                checkpointer.recovering()
            rec = Recovery(generation=rec.generation + 1, in_process=True, failures=rec.failures)


def _collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective failing because a peer went away or hung."""
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                                   "Broken pipe", "Socket closed", "Connection refused"))
