"""Atomic file writes: write to a temporary sibling, then ``os.replace``, so a reader never sees half a file.

The temporary file is created with mode 0o666 less the umask, like any file ``open(..., "w")`` makes:
``tempfile.mkstemp`` would create it 0o600, and ``os.replace`` keeps that mode, so every manifest,
report and provenance file would be private to its writer.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

_MODE = 0o666  # the kernel applies the umask, exactly as for open(..., "w")


def _create_temp(path: Path) -> Path:
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _MODE)
        except FileExistsError:  # another writer's temporary file: draw another name
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
