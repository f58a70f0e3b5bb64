"""`TierckptCheckpointIO`: Lightning's checkpoints saved into, and restored from, the node daemon.

`Trainer(plugins=[TierckptCheckpointIO({...})])` keeps Lightning's paths: each checkpoint is a
tierckpt step of its own (numbered by this plugin, not by the global step, so two saves at one
global step, such as `epoch=0-step=10.ckpt` and `last.ckpt`, never collide), and the path Lightning
asked for gets a small JSON *pointer* file naming the namespace, the step and a random save id.
So `ModelCheckpoint` (top-k, `save_last`, `save_last="link"`), `ckpt_path=<path>` and
`ckpt_path="last"` (found by listing the folder) work as with files, across processes.

A Lightning checkpoint maps onto one shard: every plain tensor is a tensor of the shard, the rest
(epoch, loops, callbacks, hyper-parameters) goes into the shard's JSON tree, both covered by its
checksums. `AttributeDict`s and numpy scalars are recorded by path and rebuilt. Any other value
is `torch.save`d into a uint8 tensor of the shard and restored, only once every chunk of the shard
verified, with `torch.load(weights_only=True)` (plus `safe_globals`); a value that would not
restore that way is refused when it is saved, naming its path.

Saves are asynchronous by default: `save_checkpoint` returns once the state is copied into the
daemon's memory; a background thread writes the pointer file once the step is visible
(checksummed), so a pointer never names a partial step, and a removal or an overwritten pointer
deletes its step from the daemon then. A save that fails in the background is raised by the next
`save_checkpoint`, `load_checkpoint`, `remove_checkpoint` or `teardown`.

Lightning saves through `CheckpointIO` on global rank 0 only (single-device, DDP): the plugin
saves as rank 0 of a world of 1 and every rank loads that shard.
"""

from __future__ import annotations

import collections
import io
import json
import os
import threading
import uuid
from collections import OrderedDict

from . import shard
from .checkpointer import Checkpointer, _dist, validate_config
from .errors import AlreadyExistsError, NotFoundError, TierckptError

try:
    from lightning.fabric.plugins import CheckpointIO
except ImportError:  # pragma: no cover
    try:
        from pytorch_lightning.plugins.io import CheckpointIO
    except ImportError as e:
        raise ImportError("tierckpt.lightning needs `lightning` (pip install lightning)") from e

__all__ = ["TierckptCheckpointIO", "POINTER_FORMAT"]

POINTER_FORMAT = "tierckpt-lightning/1"
_POINTER_MAX = 64 << 10
_PLAIN = (type(None), bool, int, float, str, bytes)  # a bytearray goes as a blob: the tree makes it bytes


class _RankZero(Checkpointer):
    """A Checkpointer for Lightning: Lightning calls load on each rank on its own, so a load is no
    collective (no barrier) and discards nothing (one process writes, through its own pointers)."""

    def _after_resume(self, step):
        pass


def _where(path) -> str:
    return "checkpoint" + "".join(f"[{p!r}]" for p in path)


def _is_attribute_dict(x) -> bool:
    t = type(x)
    return t.__name__ == "AttributeDict" and t.__module__.split(".")[0] in ("lightning", "pytorch_lightning",
                                                                             "lightning_fabric")


def _np_ok(dt) -> bool:
    return dt.byteorder in "=|<" and dt.newbyteorder("=") in shard._NP_TO_ST


def _plain_tensor(x) -> bool:
    import torch
    return (type(x) in (torch.Tensor, torch.nn.Parameter) and x.layout == torch.strided and not x.is_sparse
            and x.device.type in ("cpu", "cuda") and x.dtype in shard._torch_maps()[0])


def _is_key(k) -> bool:
    return shard._plain_key(k)


class _Split:
    """A checkpoint as what the shard stores directly, plus the paths of the values typed back
    (`AttributeDict`s, numpy scalars) and of the values stored as `torch.save` blobs."""

    def __init__(self, safe_globals):
        self.safe_globals = list(safe_globals)
        self.types: list = []    # [path, "AttributeDict" or "numpy_scalar"]
        self.objects: list = []  # [path, uint8 tensor]

    def run(self, x, path):
        import numpy as np
        import torch
        t = type(x)
        if t in _PLAIN or t in (torch.Size, torch.dtype) or (t is np.ndarray and _np_ok(x.dtype)):
            return x
        if isinstance(x, np.generic) and _np_ok(x.dtype):  # a numpy scalar: a 0-d array, typed back
            self.types.append([list(path), "numpy_scalar"])
            return np.asarray(x)
        if t in (dict, OrderedDict) or _is_attribute_dict(x):
            if all(_is_key(k) for k in x):
                if t not in (dict, OrderedDict):
                    self.types.append([list(path), "AttributeDict"])
                    t = dict
                return t((k, self.run(v, path + [k])) for k, v in x.items())
        elif t is list:
            return [self.run(v, path + [i]) for i, v in enumerate(x)]
        elif t is tuple:
            return tuple(self.run(v, path + [i]) for i, v in enumerate(x))
        elif isinstance(x, torch.Tensor) and _plain_tensor(x):
            return x
        self.objects.append([list(path), self._blob(x, path)])
        return None

    def _blob(self, x, path):
        import torch
        buf = io.BytesIO()
        try:
            torch.save(x, buf)
            with torch.serialization.safe_globals(self.safe_globals):
                torch.load(io.BytesIO(buf.getvalue()), weights_only=True, map_location="cpu")
        except Exception as e:
            raise TypeError(
                f"{_where(path)}: a value of type {type(x).__module__}.{type(x).__qualname__} would not load back "
                f"with torch.load(weights_only=True), so it is not saved ({e}); store plain values there, or "
                "pass its classes in TierckptCheckpointIO(safe_globals=[...]) if they are safe to unpickle") from None
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _put(node, path, value):
    """`node` with the value at `path` replaced (tuples rebuilt)."""
    if not path:
        return value
    k, rest = path[0], path[1:]
    if isinstance(node, tuple):
        items = list(node)
        items[k] = _put(items[k], rest, value)
        return tuple(items)
    node[k] = _put(node[k], rest, value)
    return node


def _path_key(p):
    return [tuple(k) if isinstance(k, list) else k for k in p]  # JSON gives tuples back as lists


def _read_pointer(path: str):
    """The pointer at `path` (a dict), or None if `path` is no pointer file."""
    try:
        with open(path, "rb") as f:
            head = f.read(_POINTER_MAX + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if len(head) > _POINTER_MAX or not head.lstrip().startswith(b"{"):
        return None
    try:
        p = json.loads(head)
    except ValueError:
        return None
    if not isinstance(p, dict) or p.get("format") != POINTER_FORMAT:
        return None
    if not (isinstance(p.get("namespace"), str) and type(p.get("step")) is int and p["step"] >= 0
            and isinstance(p.get("id"), str)):
        raise TierckptError(f"{path} is a tierckpt pointer without a valid namespace, step and id: {p!r}")
    return p


def _write_atomically(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tierckpt-{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _local(path) -> str:
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if p.startswith("file://"):
        p = p[len("file://"):]
    elif "://" in p:
        raise ValueError(f"TierckptCheckpointIO keeps its pointer files on a local file system, got {p!r}; "
                         "the checkpoint data lives in the daemon (set its persistent_path for s3://...)")
    return os.path.abspath(p)


class TierckptCheckpointIO(CheckpointIO):
    """Lightning `CheckpointIO` that saves each checkpoint into the node daemon's memory tier.

    >>> trainer = Trainer(plugins=[TierckptCheckpointIO({"namespace": "my-run"})],
    ...                   callbacks=[ModelCheckpoint(dirpath="ckpt", save_last=True)])
    >>> trainer.fit(model, ckpt_path="last")

    `config` is the `Checkpointer`'s (`socket`, `namespace`, `async_save`, and the settings of a
    daemon it starts). `safe_globals` are classes `torch.load(weights_only=True)` may rebuild
    for values that are neither tensors nor plain Python values. `timeout_s` bounds the wait for a
    background save at `teardown`.
    """

    def __init__(self, config: dict | None = None, safe_globals=(), timeout_s: float = 600.0):
        self.config = dict(config or {})
        self.safe_globals = list(safe_globals)
        self.timeout_s = float(timeout_s)
        # validated now (a bad key fails at construction), connected at first use
        self._validated = validate_config(self.config)
        self.namespace = self._validated["namespace"]
        self.async_save = self._validated["async_save"]
        self._init_runtime()

    # -- runtime state (not pickled: ddp_spawn sends the plugin to its children) ------------
    def _init_runtime(self):
        self._ckpt = None
        self._client = None  # the pointer thread's own connection
        self._last_step = None
        self._ops: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._busy = 0
        self._errors: list = []
        self._thread = None

    def __getstate__(self):
        return {"config": self.config, "safe_globals": self.safe_globals, "timeout_s": self.timeout_s,
                "_validated": self._validated, "namespace": self.namespace, "async_save": self.async_save}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    @property
    def checkpointer(self) -> Checkpointer:
        """The `Checkpointer` (rank 0 of a world of 1), made at first use."""
        if self._ckpt is None:
            self._ckpt = _RankZero({**self.config, "namespace": self.namespace}, rank=0, world_size=1)
        return self._ckpt

    def _worker_client(self):
        if self._client is None:
            from .client import Client
            self._client = Client(self.checkpointer.socket)
        return self._client

    # -- save ----------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        """Copies `checkpoint` into a new step of the daemon; the pointer file at `path` follows
        once the step is visible (at once without `async_save`)."""
        if storage_options is not None:
            raise TypeError("TierckptCheckpointIO does not take storage_options (got "
                            f"{storage_options!r}): the daemon's settings decide where a checkpoint goes")
        self._raise_errors()
        path = _local(path)
        split = _Split(self.safe_globals)
        tree = split.run(checkpoint, [])
        save_id = uuid.uuid4().hex
        state = {"lightning": {"format": POINTER_FORMAT, "id": save_id, "path": path},
                 "checkpoint": tree, "types": split.types, "objects": split.objects}
        ckpt = self.checkpointer
        step = None
        for attempt in range(3):
            try:
                step = self._next_step()
                ckpt.save(step, state)
                break
            except AlreadyExistsError:
                self._last_step = step  # another writer took it: the next one
                if attempt == 2:
                    raise
            except TierckptError as e:
                err = _context(e, f"saving checkpoint {path} (global step {checkpoint.get('global_step')}) "
                                  f"as step {step} of {self.namespace!r} failed")
                self._flush()  # an earlier save that failed in the background is the cause to name first
                with self._cv:
                    earlier, self._errors = self._errors, []
                if earlier:
                    err = _context(earlier[0], str(err), after=True)
                raise err from e
        self._last_step = step
        pointer = {"format": POINTER_FORMAT, "namespace": self.namespace, "step": step, "id": save_id,
                   "global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")}
        self._submit(("write", path, pointer))

    def _next_step(self) -> int:
        """One past the last step this plugin saved; the first time, one past every step the
        daemon knows (in memory, incomplete ones included, on peers or persisted). Asked once:
        `latest` waits for seals in flight."""
        if self._last_step is None:
            c = self.checkpointer.client
            known = [s["step"] for s in c.list_steps(self.namespace)]
            self._last_step = max([c.latest(self.namespace) or 0, *known])
        return self._last_step + 1

    # -- the pointer thread ----------------------------------------------------------------
    def _submit(self, op) -> None:
        if not self.async_save:
            self._run_op(op)
            self._raise_errors()
            return
        with self._cv:
            self._ops.append(op)
            self._busy += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="tierckpt-lightning", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._ops:
                    if not self._cv.wait(30.0) and not self._ops:
                        self._thread = None
                        return
                op = self._ops[0]
            try:
                self._run_op(op)
            finally:
                with self._cv:
                    self._ops.popleft()
                    self._busy -= 1
                    self._cv.notify_all()

    def _run_op(self, op) -> None:
        kind, path = op[0], op[1]
        try:
            if kind == "write":
                self._write(path, op[2])
            else:
                self._remove(path)
        except Exception as e:
            if kind == "write":
                p = op[2]
                err = _context(e, f"checkpoint {path} (step {p['step']} of {p['namespace']!r}) was not saved, so no "
                                  "file was written at that path (earlier checkpoints are intact)")
            else:
                err = _context(e, f"removing checkpoint {path} failed")
            err.__cause__ = e
            with self._cv:
                self._errors.append(err)

    def _write(self, path: str, pointer: dict) -> None:
        step = pointer["step"]
        if self.async_save:
            self._worker_client().wait_visible(self.namespace, step, 0, int(self.timeout_s * 1000))
        old = None if os.path.islink(path) else _read_pointer(path)
        _write_atomically(path, (json.dumps(pointer, indent=1) + "\n").encode())
        if old is not None and old["step"] != step:
            self._forget(old, path)

    def _remove(self, path: str) -> None:
        if os.path.islink(path):  # save_last="link": the target keeps its step
            os.unlink(path)
            return
        old = _read_pointer(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        if old is not None:
            self._forget(old, path)

    def _forget(self, pointer: dict, path: str) -> None:
        """Deletes the step of a pointer gone from `path`, unless another pointer beside it names it."""
        if pointer["namespace"] != self.namespace:
            return
        d = os.path.dirname(path)
        try:
            entries = list(os.scandir(d))
        except OSError:
            entries = []
        for e in entries:
            if e.path != path and e.is_file(follow_symlinks=False) and e.stat().st_size <= _POINTER_MAX:
                try:
                    other = _read_pointer(e.path)
                except TierckptError:
                    continue
                if other and other["namespace"] == pointer["namespace"] and other["step"] == pointer["step"]:
                    return
        client = self._worker_client() if self.async_save else self.checkpointer.client
        try:
            client.delete_step(self.namespace, pointer["step"])
        except NotFoundError:
            pass  # dropped by retention already

    def _flush(self) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._busy == 0, self.timeout_s)

    def _raise_errors(self) -> None:
        with self._cv:
            errors, self._errors = self._errors, []
        if errors:
            if len(errors) > 1:
                errors[0] = _context(errors[0], "; ".join(str(e) for e in errors[1:]), after=True)
            raise errors[0]

    def wait(self) -> None:
        """Waits until every checkpoint saved so far is visible and its pointer file written; raises
        a save or removal that failed in the background."""
        if not self._flush():
            raise TierckptError(f"the pointer files of {self.namespace!r} were not all written after "
                                f"{self.timeout_s} s")
        self._raise_errors()

    # -- load ----------------------------------------------------------------------------
    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """The checkpoint the pointer at `path` names, every byte verified first. A file saved by
        `torch.save` (Lightning's own format) is loaded by Lightning's `TorchCheckpointIO`."""
        self.wait()
        path = _local(path)
        pointer = _read_pointer(path)
        if pointer is None:
            if not os.path.exists(path):
                raise FileNotFoundError(f"checkpoint {path} does not exist")
            from lightning.fabric.plugins import TorchCheckpointIO
            return TorchCheckpointIO().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        ns, step = pointer["namespace"], pointer["step"]
        if ns != self.namespace:
            raise TierckptError(f"checkpoint {path} is step {step} of namespace {ns!r}, but this plugin uses "
                                f"{self.namespace!r}: pass config={{'namespace': {ns!r}}}")
        try:
            state = self._load_step(step)
        except NotFoundError as e:
            raise _context(e, f"checkpoint {path} names step {step} of {ns!r}, which the daemon no longer "
                              "has (deleted, or dropped by its keep_last retention)") from e
        except TierckptError as e:
            raise _context(e, f"checkpoint {path} (step {step} of {ns!r}) cannot be loaded") from e
        meta = state.get("lightning") if isinstance(state, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != POINTER_FORMAT:
            raise TierckptError(f"checkpoint {path} names step {step} of {ns!r}, which was not saved by "
                                "TierckptCheckpointIO")
        if meta.get("id") != pointer["id"]:
            raise TierckptError(f"checkpoint {path} names step {step} of {ns!r} with save id {pointer['id']}, "
                                f"but that step holds save {meta.get('id')} (of {meta.get('path')}): the "
                                "pointer is stale")
        return self._rebuild(state, path, map_location, weights_only)

    def _load_step(self, step: int):
        ckpt = self.checkpointer
        try:
            return ckpt.load(step=step)
        except NotFoundError:
            pass
        # not in this node's memory: opening it has the daemon fetch it from a peer or the
        # persistent tier (the load itself only waits for shards of this node)
        ckpt.client.open(self.namespace, step, 0)
        try:
            ckpt.client.release(self.namespace, step, 0)
        except TierckptError:
            pass
        return ckpt.load(step=step)

    def _rebuild(self, state: dict, path: str, map_location, weights_only) -> dict:
        import torch
        out = state["checkpoint"]
        for p, blob in state["objects"]:
            try:
                with torch.serialization.safe_globals(self.safe_globals):
                    value = torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=weights_only is not False,
                                       map_location="cpu")
            except Exception as e:
                raise TierckptError(f"checkpoint {path}: {_where(_path_key(p))} does not load with "
                                    f"torch.load(weights_only=True): {e}; pass its classes in "
                                    "TierckptCheckpointIO(safe_globals=[...]) if they are safe") from None
            out = _put(out, _path_key(p), value)
        for p, kind in sorted(state["types"], key=lambda pt: -len(pt[0])):  # innermost first
            p = _path_key(p)
            node = out
            for k in p:
                node = node[k]
            if kind == "AttributeDict":
                from lightning.fabric.utilities.data import AttributeDict
                node = AttributeDict(node)
            elif kind == "numpy_scalar":
                node = node[()]
            else:
                raise TierckptError(f"checkpoint {path}: {_where(p)} has the unknown type tag {kind!r}")
            out = _put(out, p, node)
        if map_location is not None:
            out = _move(out, map_location)
        return out

    # -- remove, teardown ----------------------------------------------------------------
    def remove_checkpoint(self, path) -> None:
        """Removes the pointer file at `path` and its step from the daemon (after the saves before)."""
        self._raise_errors()
        self._submit(("remove", _local(path)))

    def teardown(self) -> None:
        """Waits for the saves in flight and their pointer files, then closes the connections;
        raises a save that failed. In a process group, after a run that ended without an
        exception, every rank waits here until rank 0's pointer files are written, so that a
        next `fit(ckpt_path="last")` finds the same file on every rank."""
        import sys
        clean = sys.exc_info()[0] is None  # not called while Lightning handles an exception
        try:
            self.wait()
        finally:
            d = _dist()
            if clean and d is not None and d.get_world_size() > 1:
                d.barrier()
            ckpt, client = self._ckpt, self._client
            self._ckpt = self._client = None
            if ckpt is not None:
                ckpt.close()
            if client is not None:
                client.close()


def _move(tree, map_location):
    import torch
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location {map_location!r}: TierckptCheckpointIO takes a device or its name "
                        "(or None: tensors come back on the cpu)")

    def mv(x):
        if isinstance(x, torch.Tensor):
            return x.to(map_location)
        if isinstance(x, dict):
            for k in x:
                x[k] = mv(x[k])
            return x
        if isinstance(x, list):
            return [mv(v) for v in x]
        if isinstance(x, tuple):
            return tuple(mv(v) for v in x)
        return x
    return mv(tree)


def _context(e: Exception, what: str, after: bool = False) -> Exception:
    """An exception of `e`'s class (a TierckptError keeps its kind) whose message starts with `what`."""
    msg = f"{e}; and after it: {what}" if after else f"{what}: {e}"
    if isinstance(e, TierckptError):
        try:
            out = type(e)(msg, e.kind)
        except TypeError:
            out = TierckptError(msg, e.kind)
        for k, v in vars(e).items():
            if k not in ("message", "args"):
                setattr(out, k, v)
        return out
    return TierckptError(msg)

