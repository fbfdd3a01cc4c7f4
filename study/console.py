"""What a run prints: log lines written through tqdm (so a progress bar and a log line never share a line),
no INFO lines and no progress bars with ``--quiet``, and every log line of a run also in ``<run>/log.txt``.

Quiet is an environment variable, so the worker processes a stage starts (head searches, data loaders) inherit it.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

QUIET_ENV = "STUDY_QUIET"
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LOG_FILE = "log.txt"
_MARK = "_study_handler"


def bars_shown() -> bool:
    """Whether progress bars are drawn (not with ``--quiet``)."""
    return os.environ.get(QUIET_ENV) != "1"


class _TqdmHandler(logging.StreamHandler):
    """A console handler that writes through ``tqdm.write``: the bars in progress are cleared, the line written,
    the bars drawn again below it (tqdm.contrib.logging's redirect, with this handler's own level)."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 -- logging must never raise into the study
            self.handleError(record)


def setup(*, quiet: bool = False, verbose: bool = False) -> None:
    """The root logger for a command: INFO (DEBUG with ``verbose``) to the log file, the console at that level or
    WARNING with ``quiet``. Where a host already handles logging (pytest), its handlers stay and no console handler
    is added, as logging.basicConfig would not."""
    os.environ[QUIET_ENV] = "1" if quiet else "0"
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, None) == "console"]:
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not root.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler.setLevel(logging.WARNING if quiet else root.level)
        setattr(handler, _MARK, "console")
        root.addHandler(handler)


def console_level() -> int:
    """The level a worker process should print at: this process's console level."""
    levels = [h.level for h in logging.getLogger().handlers if getattr(h, _MARK, None) == "console"]
    return max(levels) if levels else logging.getLogger().getEffectiveLevel()


def log_to(run_dir: Path) -> logging.Handler:
    """Also write every log line to ``run_dir/log.txt`` (appended: a resumed run adds to it); remove the handler
    with ``stop_logging`` when the run ends."""
    handler = logging.FileHandler(Path(run_dir) / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.getLogger().level)
    setattr(handler, _MARK, "file")
    logging.getLogger().addHandler(handler)
    return handler


def stop_logging(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
