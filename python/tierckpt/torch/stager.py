"""`TierckptStager`: a DCP `AsyncStager` that stages the state dict straight into daemon memory.

`stage` reserves this rank's shard of the writer's step, copies every tensor of the state
dict into it once (CUDA tensors by a device-to-host copy on a side stream into the
page-locked segment, as `Checkpointer.save` does) and returns the same state dict with
each tensor replaced by a view of its bytes in the segment (a DTensor by a DTensor over
such a view). The writer then finds each write item already in place and only seals the
segment. Non-tensor values are deep-copied; DCP serializes them later, and the writer
hands them to the coordinator for the metadata shard.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.checkpoint.staging import AsyncStager

from .. import shard
from . import layout
from .session import rank_world
from .writer import TierckptWriter


class StagedShard:
    """A reserved, filled segment waiting for the writer's seal."""

    def __init__(self, session, res, seg, refs, events):
        self.session, self.res, self.seg, self.events = session, res, seg, events
        self.base = seg.tensor().data_ptr()
        self.by_offset = {r.offset: (r.name, r.nbytes) for r in refs}
        self.done = False

    def entry_of(self, t: torch.Tensor):
        """(entry, nbytes) when `t` is exactly one staged tensor's bytes in this segment, else None."""
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        e = self.by_offset.get(t.data_ptr() - self.base)
        if e is None or e[1] != t.numel() * t.element_size():
            return None
        return e

    def seal(self, what: str) -> None:
        for ev in self.events:
            ev.synchronize()
        self.done = True
        self.session.seal(self.res["id"], what)

    def abort(self) -> None:
        if not self.done:
            self.done = True
            for ev in self.events:
                try:
                    ev.synchronize()
                except Exception:
                    pass
            self.session.abort(self.res["id"])


def _walk(x, path, found):
    """Collects (path, tensor) for every tensor (DTensor: its local tensor) in dicts, lists and tuples."""
    from torch.distributed.tensor import DTensor
    if isinstance(x, DTensor):
        found.append((path, x.to_local(), x))
    elif isinstance(x, torch.Tensor):
        found.append((path, x, None))
    elif isinstance(x, dict):
        for k, v in x.items():
            _walk(v, path + [str(k)], found)
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _walk(v, path + [str(i)], found)


def _rebuild(x, views):
    """`x` with each tensor replaced by its staged view (by identity) and other leaves deep-copied."""
    from torch.distributed.tensor import DTensor
    if isinstance(x, torch.Tensor):
        v = views.get(id(x))
        if v is None:
            return x.detach().clone()  # not stageable (dtype, layout): a private copy
        if isinstance(x, DTensor):
            if v.device.type == x.device_mesh.device_type:
                return DTensor.from_local(v, x.device_mesh, x.placements, run_check=False, shape=x.shape,
                                          stride=x.stride())
            # from_local would move a host view back to the mesh's device: keep the spec, swap the local
            return DTensor(v, x._spec, requires_grad=False)
        return v
    if type(x) is dict:
        return {k: _rebuild(v, views) for k, v in x.items()}
    if isinstance(x, dict):
        return type(x)((k, _rebuild(v, views)) for k, v in x.items())
    if isinstance(x, list):
        return [_rebuild(v, views) for v in x]
    if isinstance(x, tuple):
        return tuple(_rebuild(v, views) for v in x)
    return copy.deepcopy(x)


class TierckptStager(AsyncStager):
    """Stages for `writer` (its `step` must be set before `dcp.async_save`: the memory is reserved first).

    >>> writer = TierckptWriter(namespace="job")
    >>> stager = TierckptStager(writer)
    >>> writer.step = step
    >>> fut = dcp.async_save(state_dict, storage_writer=writer, async_stager=stager)
    """

    _synchronize_after_execute = False

    def __init__(self, writer: TierckptWriter):
        if not isinstance(writer, TierckptWriter):
            raise TypeError(f"TierckptStager stages for a TierckptWriter, got {type(writer).__name__}")
        self.writer = writer

    def stage(self, state_dict):
        w = self.writer
        step = w._need_step()
        session = w.session
        w.rank, w.world = rank_world()  # stage runs before DCP sets the writer up
        rank, world = w.rank, w.world
        ck = session.ckpt(rank)
        if step in w._staged:
            w._staged.pop(step).abort()
        found = []
        _walk(state_dict, [], found)
        to_st, _ = shard._torch_maps()
        names, refs, keep = layout.Names(), [], []
        for path, local, _dt in found:
            if (local.dtype not in to_st or local.layout != torch.strided or not local.numel()
                    or local.device.type not in ("cpu", "cuda")):
                continue  # copied privately by _rebuild; the writer sends its bytes inline
            refs.append(layout.tensor_ref(names(".".join(path) or "tensor"), local))
            keep.append(local)
        header, length = layout.plan(refs, step, rank, {"dcp": "staged"})
        res, seg = session.reserve(step, rank, world, length)
        try:
            host = [r for r in refs if r.value.device.type == "cpu"]
            dev = [r for r in refs if r.value.device.type == "cuda"]
            shard.write(seg.mm, header, host)
            events = [ev for _, ev in ck._copy_to_segment(seg, dev)] if dev else []
            u8 = seg.tensor()
            views = {}
            for r, local in zip(refs, keep):
                views[id(local)] = u8[r.offset:r.offset + r.nbytes].view(local.dtype).view(local.shape)
            for path, local, dt in found:
                if dt is not None and id(local) in views:
                    views[id(dt)] = views[id(local)]
            staged_sd = _rebuild(state_dict, views)
        except BaseException:
            session.abort(res["id"])
            raise
        w._staged[step] = StagedShard(session, res, seg, refs, events)
        return staged_sd

    def synchronize_staging(self) -> None:
        """Blocks until the device-to-host copies of the last `stage` are done (a no-op on CPU)."""
        for s in self.writer._staged.values():
            for ev in s.events:
                ev.synchronize()

    def close(self) -> None:
        """Gives back staged memory no save sealed."""
        for step in list(self.writer._staged):
            self.writer._staged.pop(step).abort()
