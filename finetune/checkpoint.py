"""Checkpoints: written atomically (temporary name, then ``os.replace``) and tied to the run spec they belong to,
so a resume never continues a different run.
"""
from __future__ import annotations

from pathlib import Path

import torch

from study.atomic import atomic_path


class CheckpointMismatch(ValueError):
    """A checkpoint that belongs to another run spec."""


def save_checkpoint(path: str | Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, *, run_key: str) -> dict | None:
    """The payload at ``path`` if it exists; an error if it was written for another ``run_key``."""
    path = Path(path)
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("run_key") != run_key:
        raise CheckpointMismatch(f"{path} belongs to run {payload.get('run_key')}, not {run_key}; "
                                 "delete that folder to start over")
    return payload
