"""Reads a shard's tensors out in one pass, verifying as it copies.

Each checksum chunk (the manifest's, 4 MiB) is read once and hashed, and
only then are the parts of tensors lying in it copied: on the CPU from a
small buffer the chunk was read into (`pread`, no page faults on a
mapping), while it is still in cache, by up to `LOAD_THREADS` threads
taking every n-th chunk; to CUDA tensors by a host-to-device
copy on a side stream from the shard's mapping (page-locked with
`cudaHostRegister` when CUDA allows), which overlaps the hash of the next
chunk. So no unverified byte ever reaches a tensor. On a mismatch the copy
stops: tensors filled in place may then hold verified bytes of the shard in
part (`CorruptError.partial` names them); tensors made for the result are
dropped.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import mmap
import os
import warnings

import numpy as np
import xxhash

from . import shard
from .errors import CorruptError, NotFoundError, TierckptError


class _Part:
    """Bytes [start, end) of the file go to `dest` (a flat uint8 ndarray, or a CUDA uint8 tensor)."""

    __slots__ = ("start", "end", "dest", "name", "inplace", "device")

    def __init__(self, start, end, dest, name, inplace, device):
        self.start, self.end, self.dest = start, end, dest
        self.name, self.inplace, self.device = name, inplace, device


class Plan:
    """Where each tensor's bytes go; filled by the caller while it rebuilds the tree."""

    def __init__(self):
        self.parts: list[_Part] = []
        self.finish: list = []  # callables run once every chunk is verified (staged targets)
        self.touched: set[str] = set()

    def add(self, start, nbytes, dest, name, inplace, device=None):
        if nbytes:
            self.parts.append(_Part(start, start + nbytes, dest, name, inplace, device))

    @property
    def cuda(self) -> bool:
        return any(p.device is not None for p in self.parts)


def _flat_u8(t):
    """A contiguous torch tensor's bytes as a flat uint8 tensor (shares memory)."""
    torch = shard._torch()
    return t.detach().reshape(-1).view(torch.uint8)


def target(plan: Plan, name: str, start: int, nbytes: int, kind: str, st: str, shape, tgt):
    """The tensor to return for entry `name` (`tgt` itself when it matches), its bytes planned."""
    need = shard.DTYPES[st][0]
    for d in shape:
        need *= d
    if nbytes != need:
        raise TierckptError(f"tensor {name!r} of the shard has {nbytes} bytes; {st} of shape {list(shape)} "
                            f"needs {need}: the shard is malformed")
    if kind == "torch":
        torch = shard._torch()
        _, from_st = shard._torch_maps()
        dt = from_st[st]
        if isinstance(tgt, torch.Tensor) and tgt.dtype == dt and tuple(tgt.shape) == tuple(shape):
            dev = tgt.device.type
            if dev not in ("cpu", "cuda"):
                raise TypeError(f"the target of {name!r} is a tensor on device {tgt.device}; load into "
                                "cpu or cuda tensors, or pass no target to get new CPU tensors")
            if tgt.is_contiguous():
                flat = _flat_u8(tgt)
                plan.add(start, nbytes, flat.numpy() if dev == "cpu" else flat, name, True,
                         None if dev == "cpu" else tgt.device)
            else:
                tmp = torch.empty(tuple(shape), dtype=dt, device=tgt.device)
                flat = _flat_u8(tmp)
                plan.add(start, nbytes, flat.numpy() if dev == "cpu" else flat, name, False,
                         None if dev == "cpu" else tgt.device)

                def finish(tgt=tgt, tmp=tmp):
                    with torch.no_grad():
                        tgt.copy_(tmp)
                    plan.touched.add(name)
                plan.finish.append(finish)
            return tgt
        out = torch.empty(tuple(shape), dtype=dt)
        plan.add(start, nbytes, _flat_u8(out).numpy(), name, False)
        return out
    npdt = shard.DTYPES[st][1]
    if (isinstance(tgt, np.ndarray) and tgt.dtype == npdt and tgt.shape == tuple(shape)
            and tgt.flags.writeable and tgt.flags.c_contiguous):
        plan.add(start, nbytes, tgt.reshape(-1).view(np.uint8), name, True)
        return tgt
    if isinstance(tgt, np.ndarray) and tgt.dtype == npdt and tgt.shape == tuple(shape) and tgt.flags.writeable:
        tmp = np.empty(tuple(shape), dtype=npdt)
        plan.add(start, nbytes, tmp.reshape(-1).view(np.uint8), name, False)

        def finish_np(tgt=tgt, tmp=tmp):
            tgt[...] = tmp
            plan.touched.add(name)
        plan.finish.append(finish_np)
        return tgt
    out = np.empty(tuple(shape), dtype=npdt)
    plan.add(start, nbytes, out.reshape(-1).view(np.uint8), name, False)
    return out


def _mismatch(path, i, a, b, want, got):
    return CorruptError(f"corrupt: {path} chunk {i} (bytes {a}..{b}): expected xxh3-128 {want}, "
                        f"found {got:032x}")


def load(path: str, manifest: dict, build):
    """Verifies and copies shard `path`; `build(entries, meta, data_start, plan)` rebuilds the tree,
    planning each tensor with `target`, and its result is returned once every chunk verified."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _load(fd, path, manifest, build)
    finally:
        os.close(fd)


def _load(fd, path, man, build):
    size = os.fstat(fd).st_size
    if size != man["file_len"] or size == 0:
        raise CorruptError(f"{path}: {size} bytes, the manifest says {man['file_len']}")
    cs = int(man["chunk_size"])
    want = man["chunks"]
    if cs <= 0 or len(want) != -(-size // cs):
        raise CorruptError(f"{path}: the manifest lists {len(want)} chunks of {cs} bytes for {size} bytes")

    def chunk(i):
        return i * cs, min((i + 1) * cs, size)

    def read(buf, a, b):
        mv = memoryview(buf)[: b - a]
        got = 0
        while got < b - a:
            n = os.preadv(fd, [mv[got:]], a + got)
            if n <= 0:
                raise CorruptError(f"{path}: ended at byte {a + got}, the manifest says {size} bytes")
            got += n
        return mv

    def verify(i, mv):
        a, b = chunk(i)
        got = xxhash.xxh3_128_intdigest(mv)
        if got != int(want[i], 16):
            raise _mismatch(path, i, a, b, want[i], got)

    # the header's chunks first: verified before the header is parsed
    n = int.from_bytes(os.pread(fd, 8, 0).ljust(8, b"\0"), "little")
    head_end = min(size, 8 + min(n, shard.MAX_HEADER_LEN))
    head_chunks = -(-head_end // cs)
    head = bytearray(chunk(head_chunks - 1)[1])
    for i in range(head_chunks):
        a, b = chunk(i)
        verify(i, read(memoryview(head)[a:], a, b))
    entries, meta, data_start = shard.parse_header(head)
    plan = Plan()
    out = build(entries, meta, data_start, plan)
    parts = sorted(plan.parts, key=lambda p: p.start)
    for p in parts:
        if p.start < data_start or p.end > size:
            raise CorruptError(f"{path}: tensor {p.name!r} at bytes {p.start}..{p.end} lies outside the data "
                               f"({data_start}..{size})")
    try:
        if plan.cuda:
            _copy_cuda(fd, path, size, head_chunks, chunk, verify, parts, plan, len(want))
        else:
            _copy_cpu(head_chunks, head, chunk, read, verify, parts, plan, len(want))
        for f in plan.finish:
            f()
    except CorruptError as e:
        e.partial = sorted(plan.touched)
        raise
    finally:
        # the caller's tree-rebuilding closures form a cycle holding `plan`: let go of the tensors now,
        # not at the next garbage collection
        parts.clear()
        plan.parts.clear()
        plan.finish.clear()
    return out


def _copy_parts(parts, k, a, b, src, plan, to_cuda=None):
    """Copies the parts of [a, b) from `src` (that range's bytes); returns the next part index."""
    while k < len(parts) and parts[k].start < b:
        p = parts[k]
        lo, hi = max(a, p.start), min(b, p.end)
        if lo < hi:
            if p.inplace:
                plan.touched.add(p.name)
            if p.device is None:
                np.copyto(p.dest[lo - p.start:hi - p.start], src[lo - a:hi - a])
            else:
                to_cuda(p, lo, hi)
        if p.end > b:
            break
        k += 1
    return k


# Threads that read, hash and copy chunks side by side (pread, the hash and numpy's copy let go of the GIL).
LOAD_THREADS = max(1, min(4, os.cpu_count() or 1))


def _copy_cpu(head_chunks, head, chunk, read, verify, parts, plan, nchunks):
    _copy_parts(parts, 0, 0, chunk(head_chunks - 1)[1], np.frombuffer(head, np.uint8), plan)
    ends = [p.end for p in parts]  # sorted: parts do not overlap
    rest = range(head_chunks, nchunks)
    lanes = max(1, min(LOAD_THREADS, len(rest)))

    def lane(first):
        buf = np.empty(chunk(0)[1] - chunk(0)[0], np.uint8)
        for i in rest[first::lanes]:
            a, b = chunk(i)
            mv = read(buf, a, b)
            verify(i, mv)
            _copy_parts(parts, bisect.bisect_right(ends, a), a, b, buf, plan)

    if lanes <= 1:
        lane(0)
        return
    with concurrent.futures.ThreadPoolExecutor(lanes, thread_name_prefix="tierckpt-load") as pool:
        done = [pool.submit(lane, k) for k in range(lanes)]
    errors = [f.exception() for f in done if f.exception() is not None]
    if errors:
        raise errors[0]


def _copy_cuda(fd, path, size, head_chunks, chunk, verify, parts, plan, nchunks):
    """Hash each chunk from the mapping, then enqueue its parts' host-to-device copies on the side
    stream of their device; CPU parts are copied from the mapping. Streams are synchronised before
    the mapping goes, whatever happened."""
    from . import cuda
    torch = shard._torch()
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    src = src_np = None
    registered = False
    streams = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: only read from
            src = torch.frombuffer(mm, dtype=torch.uint8)
        registered = cuda.register(src.data_ptr(), size, read_only=True, what=f"shard {path}")
        src_np = src.numpy()
        for p in parts:
            if p.device is not None and p.device not in streams:
                s = cuda.side_stream(p.device)
                s.wait_stream(torch.cuda.current_stream(p.device))  # the targets' pending work first
                streams[p.device] = s

        def to_cuda(p, lo, hi):
            with torch.cuda.stream(streams[p.device]):
                p.dest[lo - p.start:hi - p.start].copy_(src[lo:hi], non_blocking=True)

        mv = memoryview(mm)
        try:
            end = chunk(head_chunks - 1)[1]
            k = _copy_parts(parts, 0, 0, end, src_np[:end], plan, to_cuda)
            for i in range(head_chunks, nchunks):
                a, b = chunk(i)
                verify(i, mv[a:b])
                k = _copy_parts(parts, k, a, b, src_np[a:b], plan, to_cuda)
        finally:
            mv.release()
    finally:
        for s in streams.values():
            s.synchronize()
        if registered:
            cuda.unregister(src.data_ptr(), what=f"shard {path}")
        del src, src_np
        try:
            mm.close()
        except BufferError:
            pass


def load_shard(client, ns: str, step: int, rank: int, build, name: str | None = None):
    """Opens shard `rank` of `step` (leased to `client`), loads it through `load(..., build)` and releases it.
    A corrupt copy is reported to the daemon, which drops it, and the next copy (a peer's, the persistent
    tier's) is loaded once more. `name` names the shard in the errors (None: the errors as they came). A
    final CorruptError's `partial` lists the targets either attempt filled in part."""
    first = None
    partial: set = set()

    def final(message):
        e = CorruptError(message)
        e.partial = sorted(partial)
        return e

    for _attempt in range(2):
        try:
            opened = client.open(ns, step, rank)
        except NotFoundError as e:
            if first is not None:
                raise final(f"{first}; no other copy could be loaded: {e}") from None
            if name is None:
                raise
            raise NotFoundError(f"{name} is missing: {e}") from None
        try:
            return load(opened["path"], opened["manifest"], build)
        except CorruptError as e:
            _release(client, ns, step, rank)
            client.report_corrupt(ns, step, rank)
            partial.update(getattr(e, "partial", ()))
            if first is not None:
                raise final(f"{first}; the next copy is corrupt too: {e}") from None
            first = e if name is None else CorruptError(f"{name} is corrupt, never loaded: {e}")
        finally:
            _release(client, ns, step, rank)
    raise AssertionError("unreachable")


def _release(client, ns: str, step: int, rank: int) -> None:
    try:
        client.release(ns, step, rank)
    except TierckptError:
        pass
