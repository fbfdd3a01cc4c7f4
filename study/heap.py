"""Freed heap memory handed back to the operating system in the fine-tune loops (training and prediction).

glibc raises its mmap threshold each time a freed block was mmapped (up to 32 MiB), so the few-MB buffers of every
later batch come from the heap, whose freed pages it keeps: a loop whose live tensors stay flat grows the process by
GBs (Lite2's ``last:1`` test prediction over 7,326 images: peak 3.3-5.0 GiB in three runs with ~1.4 GiB live;
1.6-1.8 GiB when ``malloc_trim`` runs every 16 batches, at the same speed; a fixed mmap threshold also bounds it but
made the loop 2-2.7x slower). Where the C library is not glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import functools

EVERY = 16  # batches between two trims


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (macOS and Windows cannot load libc.so.6; musl loads itself, without it)."""
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim(0)``)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def trimmed(batches, *, every: int = EVERY):
    """``batches``, trimming the heap before batches 0, ``every``, 2 x ``every``, ..."""
    if every < 1:
        raise ValueError(f"every={every}; allowed: an integer >= 1")
    for i, batch in enumerate(batches):
        if i % every == 0:
            trim()
        yield batch
