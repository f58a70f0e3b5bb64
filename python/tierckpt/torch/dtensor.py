"""DTensors in the `Checkpointer`: each rank saves its local chunk with the global shape and the chunk's
offsets (a `__dtensor__` node of the shard's tree); a load fills each target's local chunk from every
saved chunk that overlaps it, reading the other ranks' shards of the step where its own does not cover
it. So a step saved on N ranks loads on M ranks, into DTensors of any layout or into plain (full) tensors.
"""

from __future__ import annotations

import json

import torch

from .. import restore, shard
from ..errors import TierckptError


def is_dtensor(x) -> bool:
    if type(x).__name__ != "DTensor":
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(x, DTensor)


def local_region(x) -> tuple[tuple, tuple]:
    """(shape, global offsets) of a DTensor's local chunk; TypeError for placements that are not data."""
    from torch.distributed.tensor import Replicate, Shard
    for p in x.placements:
        if not isinstance(p, (Shard, Replicate)):
            raise TypeError(f"DTensor placement {p} is not supported (Shard and Replicate are): a partial "
                            "value is not the tensor's data; redistribute it first")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offsets = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    return tuple(int(s) for s in shape), tuple(int(o) for o in offsets)


def encode(x, where: str):
    """(local tensor, node fields) for DTensor `x`: the node records the global shape and the offsets."""
    shape, offsets = local_region(x)
    local = x.to_local()
    if tuple(local.shape) != shape:
        raise TypeError(f"{where}: the local tensor of this DTensor has shape {list(local.shape)}, its placements "
                        f"say {list(shape)} (an unsupported sharding); redistribute it first")
    return local, {"shape": [int(s) for s in x.shape], "offsets": list(offsets)}


def _contains(outer_off, outer_shape, off, shape) -> bool:
    return all(o <= a and a + n <= o + m for o, m, a, n in zip(outer_off, outer_shape, off, shape))


def _copy_overlap(dst, dst_off, src, src_off) -> None:
    """Copies the part of chunk `src` (at global `src_off`) that lies in `dst` (at `dst_off`)."""
    s, d = src, dst
    for dim in range(dst.dim()):
        lo = max(dst_off[dim], src_off[dim])
        hi = min(dst_off[dim] + dst.shape[dim], src_off[dim] + src.shape[dim])
        if hi <= lo:
            return
        s = s.narrow(dim, lo - src_off[dim], hi - lo)
        d = d.narrow(dim, lo - dst_off[dim], hi - lo)
    with torch.no_grad():
        d.copy_(s)


class _Job:
    __slots__ = ("name", "dst", "off", "gshape", "chunks")

    def __init__(self, name, dst, off, gshape):
        self.name, self.dst, self.off, self.gshape = name, dst, off, gshape
        self.chunks: list = []  # (tensor, offsets) read for it

    def covered(self) -> bool:
        return any(_contains(o, tuple(t.shape), self.off, tuple(self.dst.shape)) for t, o in self.chunks)

    def overlaps(self, off, shape) -> bool:
        """Whether a chunk at `off` of `shape` holds any element of the target."""
        return all(max(a, b) < min(a + n, b + m) for a, n, b, m in zip(self.off, self.dst.shape, off, shape))


class Reshard:
    """The DTensors of one load whose target chunk differs from the chunk this rank's shard holds."""

    def __init__(self):
        self.jobs: dict[str, _Job] = {}

    def target(self, plan, entries, data_start, node, tgt):
        """The value to return for a `__dtensor__` node, its bytes planned from this shard."""
        name, gshape, off = node["local"], tuple(node["shape"]), tuple(node["offsets"])
        e = entries[name]
        a, b = e["data_offsets"]
        st, lshape = e["dtype"], tuple(e["shape"])
        _, from_st = shard._torch_maps()
        if is_dtensor(tgt) and tuple(tgt.shape) == gshape:
            tshape, toff = local_region(tgt)
            local = tgt.to_local()
            if (tshape, toff) == (lshape, off) and local.dtype == from_st[st]:
                restore.target(plan, name, data_start + a, b - a, "torch", st, lshape, local)  # in place
                return tgt
            dst, out = local, tgt
        elif isinstance(tgt, torch.Tensor) and not is_dtensor(tgt) and tuple(tgt.shape) == gshape:
            dst, out, toff = tgt, tgt, (0,) * len(gshape)
        else:
            out = torch.empty(gshape, dtype=from_st[st])
            dst, toff = out, (0,) * len(gshape)
        job = self.jobs[name] = _Job(name, dst, toff, gshape)
        if job.overlaps(off, lshape):
            job.chunks.append((restore.target(plan, name, data_start + a, b - a, "torch", st, lshape, None), off))
        return out

    def fill(self, client, namespace: str, step: int, world: int, read_rank: int) -> None:
        """Reads the other ranks' chunks the targets need, then copies every overlap into place."""
        if not self.jobs:
            return
        for r in range(world):
            if r == read_rank or all(j.covered() for j in self.jobs.values()):
                continue
            for name, chunk in _read_chunks(client, namespace, step, r, self.jobs).items():
                self.jobs[name].chunks.append(chunk)
        for job in self.jobs.values():
            if job.dst.numel() and not job.chunks and job.dst.dim():
                raise TierckptError(f"step {step} of {namespace!r}: no rank's shard holds any of {job.name!r} "
                                    f"at offsets {list(job.off)}")
            for t, o in job.chunks:
                _copy_overlap(job.dst, job.off, t, o)


def _nodes(tree, out):
    if isinstance(tree, list):
        for v in tree:
            _nodes(v, out)
    elif isinstance(tree, dict):
        if len(tree) == 1 and "__dtensor__" in tree:
            out.append(tree["__dtensor__"])
        else:
            for v in tree.values():
                _nodes(v, out)
    return out


def _read_chunks(client, ns, step, rank, jobs) -> dict:
    """{entry: (tensor, offsets)} of the chunks in shard `rank` that overlap a target, verified; the next copy
    is tried once when this one is corrupt."""
    def build(entries, meta, data_start, plan):
        if meta.get("format") != shard.FORMAT:
            raise TierckptError(f"step {step} rank {rank} of {ns!r} was not written by the Python Checkpointer")
        out = {}
        for node in _nodes(json.loads(meta["tree"]), []):
            job = jobs.get(node["local"])
            e = entries.get(node["local"])
            if job is None or e is None or not job.overlaps(tuple(node["offsets"]), tuple(e["shape"])):
                continue
            a, b = e["data_offsets"]
            t = restore.target(plan, node["local"], data_start + a, b - a, "torch", e["dtype"], e["shape"], None)
            out[node["local"]] = (t, tuple(node["offsets"]))
        return out

    return restore.load_shard(client, ns, step, rank, build,
                              f"step {step} rank {rank} of {ns!r} (read for its DTensor chunks)")
