"""Checkpoints: written atomically and durably (temporary name, fsync, ``os.replace``), tied to the run spec they
belong to (so a resume never continues a different run) and sealed with a sha256 of their bytes (so a damaged
file is noticed, never loaded as wrong weights: ``torch.load`` alone accepts altered tensor bytes).

A run folder holds ``last.pt`` (the resume point) and ``best.pt`` (the kept model):

- ``last.pt`` missing: the run starts from scratch. Damaged (truncated, altered), or pointing at a ``best.pt``
  that is missing or damaged: a warning, the file is removed and the run starts from scratch -- training is
  seeded per epoch, so it ends equal to a run that was never interrupted.
- ``best.pt`` missing or damaged once training is over: ``CheckpointDamaged`` names the file; ``last.pt`` is
  removed with it, so rerunning the same command trains this fine-tune again.
"""
from __future__ import annotations

import hashlib
import io
import logging
import pickle
import zipfile
from pathlib import Path

import torch

from study.atomic import write_bytes_atomic
from study.errors import StudyError

log = logging.getLogger(__name__)
LAST, BEST = "last.pt", "best.pt"
# The seal after the torch.save bytes: MAGIC + the sha256 (hex) of those bytes. torch.load ignores trailing bytes.
MAGIC = b"\nSTUDY-CHECKPOINT-SHA256:"
_SEAL = len(MAGIC) + 64


class CheckpointMismatch(StudyError, ValueError):
    """A checkpoint that belongs to another run spec."""


class CheckpointDamaged(StudyError):
    """A checkpoint whose bytes are missing, truncated or altered."""


def save_checkpoint(path: str | Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)  # in memory first: a full disk then fails in a plain write (OSError), not in torch
    body = buf.getbuffer()
    write_bytes_atomic(path, bytes(body) + MAGIC + hashlib.sha256(body).hexdigest().encode())


def read_checkpoint(path: str | Path) -> dict:
    """The payload at ``path``; ``CheckpointDamaged`` if it is missing, truncated or altered."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointDamaged(f"{path} is missing") from exc
    except OSError as exc:
        raise CheckpointDamaged(f"{path} cannot be read ({exc.strerror})") from exc
    body, seal = data[:-_SEAL], data[-_SEAL:]
    if seal[: len(MAGIC)] == MAGIC:
        if hashlib.sha256(body).hexdigest().encode() != seal[len(MAGIC):]:
            raise CheckpointDamaged(f"{path} does not match its checksum (the file was altered)")
    else:  # unsealed: truncated, or written before checkpoints were sealed (then torch.load decides)
        body = data
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointDamaged(f"{path} is not a readable checkpoint ({str(exc).splitlines()[0][:120]})") from exc
    if not isinstance(payload, dict):
        raise CheckpointDamaged(f"{path} holds a {type(payload).__name__}, not a checkpoint")
    return payload


def load_checkpoint(path: str | Path, *, run_key: str) -> dict | None:
    """The checkpoint at ``path`` for run ``run_key`` (see the module docstring for what a damaged one does).

    ``last.pt`` (or any resume point): None when absent or unusable; ``best.pt``: the payload, or an error."""
    path = Path(path)
    if path.name == BEST:
        return _load_kept(path, run_key=run_key)
    if not path.is_file():
        return None
    try:
        payload = _checked(read_checkpoint(path), path, run_key)
        if payload.get("best_epoch", -1) >= 0:  # the kept model it points at must be whole too
            _checked(read_checkpoint(path.parent / BEST), path.parent / BEST, run_key)
    except CheckpointDamaged as exc:
        log.warning("%s; removing %s and training this run again from scratch (it ends equal to an "
                    "uninterrupted run)", exc, path)
        path.unlink(missing_ok=True)
        return None
    return payload


def _load_kept(path: Path, *, run_key: str) -> dict:
    try:
        return _checked(read_checkpoint(path), path, run_key)
    except CheckpointDamaged as exc:
        (path.parent / LAST).unlink(missing_ok=True)
        raise CheckpointDamaged(f"the kept model of this fine-tune is unusable: {exc}. Its resume point "
                                f"{path.parent / LAST} was removed: rerun the same command to train it again "
                                f"(or delete {path.parent})") from exc


def _checked(payload: dict, path: Path, run_key: str) -> dict:
    if payload.get("run_key") != run_key:
        raise CheckpointMismatch(f"{path} belongs to run {payload.get('run_key')}, not {run_key}; "
                                 f"delete {path.parent} to start over")
    return payload
