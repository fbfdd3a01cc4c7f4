"""Freed heap memory handed back to the operating system during long tensor loops.

glibc keeps the pages of freed blocks in its heap; oneDNN's per-batch buffers of a few MB fragment it, so a loop whose
live tensors stay flat grows the process by GBs (Lite2's ``last:1`` test prediction over 7,326 images: peak 3.3-5.0 GiB
in three runs, 1.6-1.8 GiB when ``malloc_trim`` runs every 16 batches, at the same speed; a fixed mmap threshold also
bounds it but made the loop 2.5x slower). Elsewhere than glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import functools

EVERY = 16  # batches between two trims


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim(0)``)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def trimmed(batches, *, every: int = EVERY):
    """``batches``, trimming the heap before every ``every``-th one."""
    for i, batch in enumerate(batches):
        if i % every == 0:
            trim()
        yield batch
