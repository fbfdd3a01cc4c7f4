"""Where a study's artefacts live, and the resolved settings every stage receives.

Layout under ``--out`` (shared by all runs, so caches are reused across runs)::

    dataset/            manifest.csv, summary.{md,csv}, excluded.csv, duplicates.csv, *.png, file_index.csv
                        (several split seeds: dataset/seed-<s>/ each, one shared file_index.csv)
    store/<key>/        the per-image activation store (extract/store.py)
    heads/<key>/        fitted heads (joblib + meta.json + result rows)
    finetune/<key>/     checkpoints (+ result rows)
    runs/<UTC>-<name>/  config.resolved.toml, provenance.json, results.jsonl, report.md, *.csv, *.png
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from study.errors import StudyError


@dataclass(frozen=True)
class StudyContext:
    config: dict
    data_root: Path
    out_dir: Path
    run_dir: Path
    device: str
    rebuild_cache: bool = False
    split_seed_dir: str = ""  # with several split seeds, each seed's dataset lives in dataset/seed-<s>/

    @property
    def dataset_dir(self) -> Path:
        return self.out_dir / "dataset" / self.split_seed_dir if self.split_seed_dir else self.out_dir / "dataset"

    @property
    def manifest_path(self) -> Path:
        return self.dataset_dir / "manifest.csv"

    @property
    def store_dir(self) -> Path:
        return self.out_dir / "store"

    @property
    def heads_dir(self) -> Path:
        return self.out_dir / "heads"

    @property
    def finetune_dir(self) -> Path:
        return self.out_dir / "finetune"

    @property
    def results_path(self) -> Path:
        return self.run_dir / "results.jsonl"

    @property
    def seed(self) -> int:
        return self.config["seed"]

    def for_seeds(self) -> list["StudyContext"]:
        """One context per split seed (config ``seeds``, else ``seed``): the config's ``seed`` set to it."""
        import dataclasses

        seeds = list(self.config.get("seeds") or [self.config["seed"]])
        many = len(seeds) > 1
        return [dataclasses.replace(self, config={**self.config, "seed": s},
                                    split_seed_dir=f"seed-{s}" if many else "") for s in seeds]


def check_out_dir(out: Path) -> None:
    """``--out`` must be a folder this process can create and write in; say so before any work otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out} is a file, not a folder; pass a folder (it is created when absent)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise StudyError(f"--out {out} cannot be created: {existing} is a file; pass a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StudyError(f"--out {out} is not writable: {existing} does not allow this user to write; pass a "
                         "folder you can write in, or change its permissions")
    try:  # access() says yes to root on a read-only mount: a real write is the only sure test
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StudyError(f"--out {out} is not writable ({exc.strerror}); pass a folder you can write in") from exc


def resolve_device(requested: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    import torch

    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if requested == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if available[d])
    if requested not in available:
        raise ValueError(f"device {requested!r}; allowed: auto, cpu, cuda, mps")
    if not available[requested]:
        raise ValueError(f"device {requested!r} was asked for but is not available here; use --device cpu or auto")
    return requested
