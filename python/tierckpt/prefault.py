"""Mapping a daemon segment ahead of a save: its pages are faulted in and its page table is filled
for this process (`MADV_POPULATE_WRITE`), so that the copy into it later runs at memory speed."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_libc = None


def pages(length: int) -> int:
    """Pages a mapping of `length` bytes spans."""
    return -(-int(length) // PAGE)


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise


def populate_write(mm: mmap.mmap, length: int) -> None:
    """Faults every page of the first `length` bytes of the shared writable mapping `mm` in,
    writable, without changing a byte; touches one byte per page where the kernel lacks the
    advice."""
    if length <= 0:
        return
    buf = (ctypes.c_char * length).from_buffer(mm)
    try:
        if _madvise()(ctypes.addressof(buf), length, _MADV_POPULATE_WRITE) == 0:
            return
    finally:
        del buf
    for off in range(0, length, PAGE):
        mm[off] = mm[off]


def map_populated(path: str, length: int) -> tuple[int, mmap.mmap]:
    """Opens the segment `path`, maps its first `length` bytes and populates them: (fd, mapping)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_size < length:
            raise OSError(f"segment {path} is smaller than {length} bytes")
        mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    try:
        populate_write(mm, length)
    except BaseException:
        mm.close()
        os.close(fd)
        raise
    return fd, mm
