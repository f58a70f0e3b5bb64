"""A rank's state as one safetensors file, mirroring `tierckpt-format`'s layout.

Layout: 8-byte little-endian header length, the JSON header (tensors and a
`__metadata__` map of strings) padded with spaces so the data starts on a
64-byte boundary, then the tensor bytes back to back, larger element types
first (a stable sort), so every tensor is aligned to its element size.

The non-tensor part of the state goes as JSON in `__metadata__["tree"]`,
losslessly: tuples, bytes, dicts with non-string keys, inf/nan are tagged,
and each tensor is a reference to its entry by name (a DTensor's entry is
its local chunk; its node adds the global shape and the chunk's offsets,
see `tierckpt.torch.dtensor`). No pickle.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections import OrderedDict

import numpy as np

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("tierckpt needs a little-endian host (safetensors is little-endian)")

DATA_ALIGN = 64
MAX_HEADER_LEN = 100_000_000
FORMAT = "tierckpt-py/1"

# safetensors dtype -> (bytes per element, numpy dtype or None, torch dtype attribute name)
DTYPES = {
    "BOOL": (1, np.bool_, "bool"),
    "U8": (1, np.uint8, "uint8"),
    "I8": (1, np.int8, "int8"),
    "I16": (2, np.int16, "int16"),
    "U16": (2, np.uint16, "uint16"),
    "F16": (2, np.float16, "float16"),
    "BF16": (2, None, "bfloat16"),
    "I32": (4, np.int32, "int32"),
    "U32": (4, np.uint32, "uint32"),
    "F32": (4, np.float32, "float32"),
    "I64": (8, np.int64, "int64"),
    "U64": (8, np.uint64, "uint64"),
    "F64": (8, np.float64, "float64"),
    "F8_E4M3": (1, None, "float8_e4m3fn"),
    "F8_E5M2": (1, None, "float8_e5m2"),
}
_NP_TO_ST = {np.dtype(v[1]): k for k, v in DTYPES.items() if v[1] is not None}


def _torch():
    import torch  # lazily: the package works without torch for numpy state
    return torch


def _torch_maps():
    torch = _torch()
    to_st, from_st = {}, {}
    for st, (_, _, name) in DTYPES.items():
        dt = getattr(torch, name, None)
        if dt is not None:
            to_st[dt] = st
            from_st[st] = dt
    return to_st, from_st


def _is_tensor(x) -> bool:
    mod = type(x).__module__
    if not mod.startswith("torch"):
        return False
    torch = _torch()
    return isinstance(x, torch.Tensor)


class TensorRef:
    """A tensor (torch or numpy) found in the tree, with its entry name."""

    __slots__ = ("name", "value", "st_dtype", "shape", "nbytes", "offset", "kind")

    def __init__(self, name, value, st_dtype, shape, nbytes, kind):
        self.name, self.value, self.st_dtype = name, value, st_dtype
        self.shape, self.nbytes, self.kind = tuple(shape), nbytes, kind
        self.offset = 0  # absolute, set by plan()


def _key_name(k) -> str:
    s = str(k)
    return "".join(c if c.isprintable() else "?" for c in s) or "_"


def _plain_key(k) -> bool:
    t = type(k)
    if k is None or t in (str, int, float, bool):
        return True
    return t is tuple and all(_plain_key(e) for e in k)


def encode_tree(state):
    """(json-able tree, [TensorRef]); TypeError names the path of anything unsupported."""
    tensors: list[TensorRef] = []
    names: set[str] = set()
    torch_to_st = None

    def unique(name: str) -> str:
        name = name[:1000] or "_"
        if name in names or name == "__metadata__":
            i = 1
            while f"{name}#{i}" in names:
                i += 1
            name = f"{name}#{i}"
        names.add(name)
        return name

    def enc(x, path: list):
        nonlocal torch_to_st
        t = type(x)
        where = "state" + "".join(f"[{p!r}]" for p in path)
        if x is None or t is bool or t is str:
            return x
        if t is int:
            return x
        if t is float:
            if math.isfinite(x):
                return x
            return {"__float__": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if t is list:
            return [enc(v, path + [i]) for i, v in enumerate(x)]
        if t is tuple:
            return {"__tuple__": [enc(v, path + [i]) for i, v in enumerate(x)]}
        if t is bytes or t is bytearray:
            return {"__bytes__": base64.b64encode(bytes(x)).decode("ascii")}
        if t is dict or t is OrderedDict:
            tag = "__dict__" if t is dict else "__odict__"
            items = []
            for k, v in x.items():
                if not _plain_key(k):
                    raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} is not supported "
                                    "(use str, int, float, bool, None or tuples of them)")
                items.append([enc(k, path + [f"<key {k!r}>"]), enc(v, path + [k])])
            return {tag: items}
        if _is_tensor(x):
            torch = _torch()
            if torch_to_st is None:
                torch_to_st, _ = _torch_maps()
            node = None
            if type(x).__name__ == "DTensor":
                from .torch import dtensor
                if dtensor.is_dtensor(x):
                    x, node = dtensor.encode(x, where)  # its local chunk, with the global shape and offsets
            if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
                raise TypeError(f"{where}: tensor subclass {type(x).__name__} is not supported")
            if x.is_sparse or x.layout != torch.strided:
                raise TypeError(f"{where}: only dense (strided) tensors are supported, got {x.layout}")
            if x.device.type not in ("cpu", "cuda"):
                raise TypeError(f"{where}: tensor on device {x.device} cannot be checkpointed (supported: cpu "
                                "and cuda tensors); move it to one of them first")
            st = torch_to_st.get(x.dtype)
            if st is None:
                raise TypeError(f"{where}: tensor dtype {x.dtype} has no safetensors equivalent")
            name = unique(".".join(_key_name(p) for p in path) or "tensor")
            ref = TensorRef(name, x, st, x.shape, x.numel() * DTYPES[st][0], "torch")
            tensors.append(ref)
            if node is not None:
                return {"__dtensor__": {"local": name, **node}}
            return {"__tensor__": name}
        if isinstance(x, np.ndarray) and t is np.ndarray:
            st = _NP_TO_ST.get(x.dtype.newbyteorder("=")) if x.dtype.byteorder in "=|<" else None
            if st is None:
                raise TypeError(f"{where}: numpy dtype {x.dtype} has no safetensors equivalent")
            name = unique(".".join(_key_name(p) for p in path) or "array")
            tensors.append(TensorRef(name, x, st, x.shape, x.size * DTYPES[st][0], "numpy"))
            return {"__ndarray__": name}
        if t.__module__ == "torch" and t.__name__ == "Size":
            return {"__size__": [int(v) for v in x]}
        if t.__module__ == "torch" and t.__name__ == "dtype":
            return {"__dtype__": str(x).removeprefix("torch.")}
        raise TypeError(f"{where}: values of type {t.__module__}.{t.__qualname__} cannot be checkpointed "
                        "(supported: tensors, numpy arrays, None, bool, int, float, str, bytes, "
                        "lists, tuples and dicts of these); no pickle is used")

    tree = enc(state, [])
    return tree, tensors


def plan(tensors: list, metadata: dict) -> tuple[bytes, int]:
    """Header bytes and file length; sets each TensorRef's absolute offset."""
    order = sorted(range(len(tensors)), key=lambda i: -DTYPES[tensors[i].st_dtype][0])
    header = {}
    pos = 0
    rel = [0] * len(tensors)
    if metadata:
        header["__metadata__"] = metadata
    for i in order:
        t = tensors[i]
        rel[i] = pos
        header[t.name] = {"dtype": t.st_dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    js = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    padded = -(-(8 + len(js)) // DATA_ALIGN) * DATA_ALIGN - 8
    if padded > MAX_HEADER_LEN:
        raise ValueError(f"safetensors header of {padded} bytes exceeds the {MAX_HEADER_LEN}-byte limit; "
                         "use fewer tensors or less non-tensor state")
    js += b" " * (padded - len(js))
    data_start = 8 + len(js)
    for i, t in enumerate(tensors):
        t.offset = data_start + rel[i]
    return len(js).to_bytes(8, "little") + js, data_start + pos


def write(buf, header: bytes, tensors: list) -> None:
    """Writes the header and every tensor into the writable buffer `buf` (an mmap)."""
    mv = memoryview(buf)
    mv[:len(header)] = header
    for t in tensors:
        if t.nbytes == 0:
            continue
        if t.kind == "torch":
            torch = _torch()
            dst = torch.frombuffer(buf, dtype=t.value.dtype, count=t.value.numel(), offset=t.offset)
            with torch.no_grad():
                dst.view(t.shape).copy_(t.value.detach())
            del dst
        else:
            dst = np.frombuffer(buf, dtype=t.value.dtype, count=t.value.size, offset=t.offset)
            dst.reshape(t.shape)[...] = t.value
            del dst
    mv.release()


def parse_header(buf) -> tuple[dict, dict, int]:
    """(tensor entries by name, metadata, data start) of a safetensors buffer."""
    mv = memoryview(buf)
    try:
        if len(mv) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        n = int.from_bytes(mv[:8], "little")
        if n > MAX_HEADER_LEN or 8 + n > len(mv):
            raise ValueError(f"header length {n} is invalid for a file of {len(mv)} bytes")
        header = json.loads(bytes(mv[8:8 + n]))
    finally:
        mv.release()
    meta = header.pop("__metadata__", None) or {}
    return header, meta, 8 + n


def decode_tree(tree, make_tensor, target=None):
    """Rebuilds the tree; `make_tensor(kind, name, target_or_None)` returns each tensor (for kind "dtensor",
    `name` is the node: its entry, global shape and offsets)."""

    def dec(x, tgt):
        if isinstance(x, list):
            return [dec(v, _sub(tgt, i)) for i, v in enumerate(x)]
        if not isinstance(x, dict):
            return x
        if len(x) != 1:
            raise ValueError(f"malformed tree node {x!r}")
        ((tag, v),) = x.items()
        if tag == "__float__":
            return float(v)
        if tag == "__tuple__":
            return tuple(dec(e, _sub(tgt, i)) for i, e in enumerate(v))
        if tag == "__bytes__":
            return base64.b64decode(v)
        if tag in ("__dict__", "__odict__"):
            out = OrderedDict() if tag == "__odict__" else {}
            for k, val in v:
                key = dec(k, None)
                out[key] = dec(val, _sub(tgt, key))
            return out
        if tag == "__tensor__":
            return make_tensor("torch", v, tgt)
        if tag == "__dtensor__":
            return make_tensor("dtensor", v, tgt)
        if tag == "__ndarray__":
            return make_tensor("numpy", v, tgt)
        if tag == "__size__":
            return _torch().Size(v)
        if tag == "__dtype__":
            return getattr(_torch(), v)
        raise ValueError(f"unknown tag {tag!r} in the checkpoint's tree")

    try:
        return dec(tree, target)
    finally:
        dec = None  # the recursive closure refers to itself: break the cycle (it holds make_tensor)


def _sub(tgt, key):
    if tgt is None:
        return None
    try:
        if isinstance(tgt, dict):
            return tgt.get(key)
        if isinstance(tgt, (list, tuple)) and isinstance(key, int) and 0 <= key < len(tgt):
            return tgt[key]
    except Exception:
        return None
    return None
