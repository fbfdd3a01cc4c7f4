"""Atomic, durable file writes: write to a temporary sibling, fsync it, ``os.replace`` it into place, fsync the
folder -- so a reader never sees half a file, and a file that is visible survives a crash or a power cut.

A write that fails (disk full, permission denied, read-only folder) raises ``study.errors.WriteFailed``
naming the file, after removing the temporary file: the old file, if any, is untouched.

The temporary file is created with mode 0o666 less the umask, like any file ``open(..., "w")`` makes:
``tempfile.mkstemp`` would create it 0o600, and ``os.replace`` keeps that mode, so every manifest,
report and provenance file would be private to its writer.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from study.errors import WriteFailed, is_write_fault

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


def fsync_path(path: str | Path) -> None:
    """Flush a file's data (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: this file system cannot fsync a folder; nothing more to do
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (durably), on error it is removed.

    A write fault (``study.errors.WRITE_ERRNOS``) inside the block or while replacing becomes ``WriteFailed``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path)
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        if is_write_fault(exc):
            raise WriteFailed(path, exc) from exc
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_bytes_atomic(path: str | Path, data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def file_lock(path: str | Path, *, what: str = "", shared: bool = False, waiting: str = ""):
    """Hold an ``fcntl.flock`` on ``path`` (created when absent): exclusive, or ``shared`` (many readers, no
    exclusive holder); a process that must wait says so (``waiting``, else "another process <what>") first.
    Yields whether it had to wait."""
    import fcntl
    import logging

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
    except OSError as exc:
        if is_write_fault(exc):
            raise WriteFailed(path, exc) from exc
        raise
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with fh:
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log = logging.getLogger(__name__)
            if waiting:
                log.warning("%s (%s)", waiting, path)
            else:
                log.info("waiting for another process %s (%s)", what or "holding", path)
            fcntl.flock(fh, mode)
            waited = True
        else:
            waited = False
        try:
            yield waited
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
