"""CUDA helpers of the Checkpointer: page-locking the daemon's segments, side streams, events.

Everything here goes through torch's documented APIs (`torch.cuda.cudart()`
for `cudaHostRegister`/`cudaHostUnregister`, `torch.cuda.Stream`, `Event`);
nothing is imported before a CUDA tensor is seen, so CPU-only jobs never
initialise CUDA.
"""

from __future__ import annotations

import ctypes
import threading
import warnings

# cudaHostRegister flags (cuda_runtime_api.h)
HOST_REGISTER_PORTABLE = 0x01   # page-locked for every CUDA context: tensors on several devices
HOST_REGISTER_READ_ONLY = 0x08  # the mapping is PROT_READ (restore)

_streams: dict = {}
_streams_lock = threading.Lock()
_warned: set = set()


def _torch():
    import torch
    return torch


def side_stream(device):
    """This process's copy stream on `device` (one per device, created once)."""
    torch = _torch()
    idx = torch.device(device).index
    if idx is None:
        idx = torch.cuda.current_device()
    with _streams_lock:
        s = _streams.get(idx)
        if s is None:
            s = _streams[idx] = torch.cuda.Stream(device=idx)
        return s


def _clear_last_error() -> None:
    """Resets CUDA's per-thread last error after a failed cudaHostRegister/Unregister: torch's
    binding returns the code but leaves it set, and torch's next kernel-launch check would raise
    it as if the kernel had failed. libcudart is already loaded by torch; find it, never load one."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        return
    for p in sorted(paths):
        try:
            lib = ctypes.CDLL(p)
            lib.cudaGetLastError()
        except (OSError, AttributeError):
            continue


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def register(ptr: int, size: int, read_only: bool = False, what: str = "a segment") -> bool:
    """Page-locks [ptr, ptr+size) for DMA; False (and one warning) when CUDA refuses, so that the
    caller falls back to pageable copies, correct but slower."""
    torch = _torch()
    flags = HOST_REGISTER_PORTABLE | (HOST_REGISTER_READ_ONLY if read_only else 0)
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, flags))
    if err == 0:
        return True
    _clear_last_error()
    _warn_once(("register", read_only),
               f"tierckpt: cudaHostRegister of {what} ({size} bytes, flags {flags:#x}) failed with CUDA "
               f"error {err}; copying through pageable memory instead (correct, slower)")
    return False


def unregister(ptr: int, what: str = "a segment") -> None:
    """Undoes `register`; a failure is a warning (the memory is unmapped next either way)."""
    torch = _torch()
    err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if err != 0:
        _clear_last_error()
        _warn_once("unregister", f"tierckpt: cudaHostUnregister of {what} failed with CUDA error {err}")
