"""Writing a list of named values (tensors, bytes) into one daemon shard: reserve, copy, seal."""

from __future__ import annotations

import numpy as np

from .. import shard
from .session import FORMAT, Session


def entry_name(index) -> str:
    """The safetensors entry of a DCP `MetadataIndex`: its FQN, `@offsets` for a chunk not at the origin."""
    name = index.fqn
    if index.offset is not None and any(index.offset):
        name += "@" + ",".join(str(int(o)) for o in index.offset)
    return name


class Names:
    """Unique entry names (safetensors wants them distinct, and not `__metadata__`)."""

    def __init__(self):
        self._used: set = set()

    def __call__(self, name: str) -> str:
        name = name[:1000] or "_"
        base, i = name, 1
        while name in self._used or name == "__metadata__":
            name, i = f"{base}#{i}", i + 1
        self._used.add(name)
        return name


def tensor_ref(name: str, t):
    """A `shard.TensorRef` for a torch tensor: its own dtype where safetensors has one, else its bytes as U8."""
    import torch
    to_st, _ = shard._torch_maps()
    t = t.detach()
    st = to_st.get(t.dtype)
    if st is None:
        t = t.contiguous().reshape(-1).view(torch.uint8)
        st = "U8"
    return shard.TensorRef(name, t, st, t.shape, t.numel() * shard.DTYPES[st][0], "torch")


def bytes_ref(name: str, data) -> shard.TensorRef:
    a = np.frombuffer(data, dtype=np.uint8)
    return shard.TensorRef(name, a, "U8", a.shape, a.size, "numpy")


def plan(refs: list, step: int, rank: int, extra: dict | None = None):
    """(header, file length) of a shard holding `refs`; sets their offsets."""
    meta = {"format": FORMAT, "step": str(step), "rank": str(rank), **(extra or {})}
    return shard.plan(refs, meta)


def copy_into(session: Session, seg, header: bytes, refs: list) -> None:
    """Writes the header and every value into the mapped segment; CUDA tensors by a device-to-host
    copy on a side stream, waited for before this returns."""
    host = [r for r in refs if r.kind == "numpy" or r.value.device.type == "cpu"]
    dev = [r for r in refs if r.kind == "torch" and r.value.device.type == "cuda"]
    shard.write(seg.mm, header, host)
    if dev:
        for _, ev in session.ckpt()._copy_to_segment(seg, dev):
            ev.synchronize()


def write_shard(session: Session, step: int, rank: int, world: int, refs: list, what: str,
                extra: dict | None = None) -> None:
    """Reserves DCP rank `rank`'s shard (rank `world` is the metadata shard), copies `refs` in and seals it."""
    header, length = plan(refs, step, rank, extra)
    res, seg = session.reserve(step, rank, world, length)
    try:
        copy_into(session, seg, header, refs)
    except BaseException:
        session.abort(res["id"])
        raise
    session.seal(res["id"], what)
