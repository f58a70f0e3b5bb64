"""DCP's `Metadata` as bytes and back. DCP's own file writer pickles it; so do we, but the
unpickler only builds the classes such metadata is made of (DCP's metadata dataclasses,
`torch.Size`, dtypes, layouts, plain containers), so a tampered shard cannot run code."""

from __future__ import annotations

import io
import pickle

_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "Path"),
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        import torch
        if module in _DCP_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"the checkpoint's DCP metadata refers to {module}.{name}, which DCP "
                                     "metadata never holds; refusing to load it")


def dumps(metadata) -> bytes:
    return pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes):
    return _Unpickler(io.BytesIO(data)).load()
