"""The base class of errors a user can act on (bad config, missing folder, stale cache, missing weights).

``run_study.py`` prints such an error's message and exits with status 2 instead of a traceback;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
from pathlib import Path

# What a write meets on a full disk, a quota, a read-only mount or a folder it may not write in.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                          errno.EIO})


class StudyError(Exception):
    """An error whose message says what is wrong, where, and what to do."""


class WriteFailed(StudyError):
    """A file the study could not write (disk full, permission denied, read-only folder); nothing half-written is left."""

    def __init__(self, path: str | Path | None, exc: OSError):
        self.path, self.errno = path, exc.errno
        what = f"cannot write {path}" if path else "cannot write under --out"
        super().__init__(f"{what} ({exc.strerror or exc}): free disk space or fix the folder's permissions, then "
                         "rerun the same command; finished work is kept")
        self._exc = exc

    def __reduce__(self):  # raised in a head-fitting worker process, it must arrive whole in the parent
        return type(self), (self.path, self._exc)


def is_write_fault(exc: BaseException) -> bool:
    """An OSError a user fixes by freeing space or changing permissions (not a bug)."""
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS
