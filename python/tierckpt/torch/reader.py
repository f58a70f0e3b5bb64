"""`TierckptReader`: a DCP `StorageReader` over the daemon's shards of one committed step.

`read_metadata` reads the step's metadata shard (the newest committed step unless a step
is given), so a step whose save never wrote it is refused by name. `read_data` reads
every shard the local plan needs (any rank's: DCP's planner reshards), each verified
chunk by chunk as it is copied (`restore.load`); a corrupt shard is reported to the
daemon and read once more from the next tier, else `CorruptError` names it. No
unverified byte reaches a target; as with the `Checkpointer`, targets read straight from
a shard that turns out corrupt in a later chunk hold verified bytes of it in part.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .. import restore
from ..checkpointer import _dist
from ..errors import CorruptError, NotFoundError, TierckptError
from . import metadata as md_io
from .session import FORMAT, META_RANK, METADATA_ENTRY, Session, parse_namespace, parse_step, \
    valid_checkpoint_id


class TierckptReader(StorageReader):
    """Loads a DCP checkpoint written by `TierckptWriter`: step `step` of `namespace`, or the newest
    committed one.

    >>> dcp.load(state_dict, storage_reader=TierckptReader(namespace="job"))
    """

    def __init__(self, step: int | None = None, namespace: str | None = None, socket: str | None = None,
                 config: dict | None = None):
        super().__init__()
        self.step = parse_step(step)
        self.session = Session(namespace, socket, config)
        self.loaded_step: int | None = None  # the step read_metadata chose
        self._metadata: Metadata | None = None
        self._meta_entries: dict = {}

    # -- DCP's calls --------------------------------------------------------
    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            ns = parse_namespace(checkpoint_id)
            if ns is not None:
                self.session.set_namespace(ns)
            self.step = parse_step(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return valid_checkpoint_id(checkpoint_id)

    def read_metadata(self) -> Metadata:
        step = self._resolve_step()
        ns = self.session.namespace
        world = self._dcp_world(step)
        entries = self._read(step, world, None, "metadata")
        if METADATA_ENTRY not in entries:
            raise TierckptError(f"step {step} of {ns!r}: shard rank {world} holds no DCP metadata "
                                f"({METADATA_ENTRY!r}); it was not written by TierckptWriter")
        md = md_io.loads(entries.pop(METADATA_ENTRY).tobytes())
        self._meta_entries = entries
        self._metadata = md
        self.loaded_step = step
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self._metadata = metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        step = self.loaded_step
        by_rank: dict = {}
        for req in plan.items:
            rank, name, _n = self._metadata.storage_data[req.storage_index]
            by_rank.setdefault(rank, {}).setdefault(name, []).append(req)
        for rank, wanted in sorted(by_rank.items()):
            if rank == META_RANK:
                for name, reqs in wanted.items():
                    for req in reqs:
                        self._apply(req, self._meta_entries[name], planner)
                continue
            direct = {}  # entry -> (req, target): read straight into the target tensor
            for name, reqs in wanted.items():
                if len(reqs) == 1 and reqs[0].type != LoadItemType.BYTE_IO:
                    t = self._direct_target(reqs[0], planner)
                    if t is not None:
                        direct[name] = (reqs[0], t)
            got = self._read(step, rank, wanted, f"rank {rank}", {n: t for n, (_, t) in direct.items()})
            for name, reqs in wanted.items():
                if name in direct:
                    req, t = direct[name]
                    planner.commit_tensor(req, t)
                    continue
                for req in reqs:
                    self._apply(req, got[name], planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def close(self) -> None:
        """Closes the connection to the daemon (and unmaps the cached segments)."""
        self.session.close()

    # -- helpers ------------------------------------------------------------
    def _resolve_step(self) -> int:
        if self.step is not None:
            return self.step
        ck = self.session.ckpt()
        d = _dist()
        step = ck.latest_step() if d is None or d.get_world_size() == 1 or d.get_rank() == 0 else None
        if d is not None and d.get_world_size() > 1:
            t = torch.tensor([-1 if step is None else step], dtype=torch.int64)
            d.broadcast(t, src=0)
            step = None if t.item() < 0 else int(t.item())
        if step is None:
            raise NotFoundError(f"namespace {ck.namespace!r} has no committed step to load (none with its DCP "
                                "metadata written)")
        return step

    def _dcp_world(self, step: int) -> int:
        """The DCP world size of `step` (its metadata shard's rank); NotFoundError when it never committed."""
        ck = self.session.ckpt()
        ns = ck.namespace
        steps = ck.client.list_steps(ns)
        info = next((s for s in steps if s["step"] == step), None)
        if info is None:
            have = sorted(s["step"] for s in steps if s.get("complete"))
            raise NotFoundError(f"step {step} of {ns!r} does not exist in the daemon; committed steps: {have}")
        world = int(info["world_size"]) - 1
        if world not in info.get("ranks", []):
            if world in info.get("in_progress", []):
                ck.client.wait_visible(ns, step, world, 60_000)  # its seal is finishing
            else:
                have = sorted(s["step"] for s in steps if s.get("complete"))
                raise NotFoundError(
                    f"step {step} of {ns!r} has no DCP metadata (its shard rank {world} was never written): the "
                    f"save did not commit and the step is never loaded; committed steps: {have}")
        return world

    def _direct_target(self, req, planner):
        """The target tensor when one request reads a whole stored chunk into a contiguous CPU tensor of the
        same dtype and shape (no staging buffer); else None."""
        sizes, dtype = self._chunk(req.storage_index)
        if any(req.storage_offsets) or tuple(req.lengths) != tuple(sizes):
            return None
        t = planner.resolve_tensor(req).detach()
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or tuple(t.shape) != tuple(sizes):
            return None
        return t

    def _chunk(self, index):
        tmd = self._metadata.state_dict_metadata[index.fqn]
        if not isinstance(tmd, TensorStorageMetadata):
            raise TierckptError(f"{index.fqn!r} is not a tensor in the checkpoint's metadata")
        off = tuple(index.offset) if index.offset is not None else (0,) * len(tmd.size)
        for c in tmd.chunks:
            if tuple(c.offsets) == off:
                return tuple(c.sizes), tmd.properties.dtype
        raise TierckptError(f"no stored chunk of {index.fqn!r} at offsets {list(off)} in the checkpoint's metadata")

    def _apply(self, req, buf: np.ndarray, planner) -> None:
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(buf.tobytes()))
            return
        sizes, dtype = self._chunk(req.storage_index)
        src = torch.from_numpy(buf).view(dtype).view(sizes) if buf.size else torch.empty(sizes, dtype=dtype)
        src = narrow_tensor_by_index(src, req.storage_offsets, req.lengths)
        t = planner.resolve_tensor(req).detach()
        if t.size() != src.size():
            raise TierckptError(f"{req.storage_index.fqn!r}: the stored chunk gives {list(src.size())}, the "
                                f"target wants {list(t.size())}")
        t.copy_(src)
        planner.commit_tensor(req, t)

    def _read(self, step: int, rank: int, wanted, what: str, direct=None) -> dict:
        """Entries of shard `rank` of `step` (all, or the names in `wanted`) as verified uint8 arrays; those
        in `direct` are read into their target tensors instead. One more try on the next copy when corrupt."""
        ck = self.session.ckpt()
        ns, client = ck.namespace, ck.client
        shard_name = f"DCP step {step} {what} shard (rank {rank}) of {ns!r}"
        return restore.load_shard(client, ns, step, rank,
                                  lambda entries, meta, start, plan: _plan(entries, meta, start, plan, wanted,
                                                                           direct or {}, shard_name),
                                  shard_name)


def narrow_tensor_by_index(t, offsets, sizes):
    """The part of `t` at `offsets` of `sizes` (a view)."""
    for dim, (o, n) in enumerate(zip(offsets, sizes)):
        if o != 0 or n != t.size(dim):
            t = t.narrow(dim, o, n)
    return t


def _plan(entries, meta, data_start, plan, wanted, direct, shard_name) -> dict:
    if meta.get("format") != FORMAT:
        raise TierckptError(f"{shard_name} was not written by TierckptWriter (format {meta.get('format')!r})")
    names = list(entries) if wanted is None else list(wanted)
    out = {}
    for name in names:
        e = entries.get(name)
        if e is None:
            raise CorruptError(f"{shard_name} has no entry {name!r}, which the step's DCP metadata points to")
        a, b = e["data_offsets"]
        t = direct.get(name)
        if t is not None:
            if t.numel() * t.element_size() != b - a:
                raise CorruptError(f"{shard_name}: entry {name!r} has {b - a} bytes, the metadata wants "
                                   f"{t.numel() * t.element_size()}")
            plan.add(data_start + a, b - a, restore._flat_u8(t).numpy(), name, True)
            continue
        buf = np.empty(b - a, dtype=np.uint8)
        plan.add(data_start + a, b - a, buf, name, False)
        out[name] = buf
    return out
