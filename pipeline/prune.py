"""Remove the fitted heads and fine-tune checkpoints no run folder under ``--out`` uses any more.

    python -m pipeline.prune out --dry-run     # what would go, and how much disk it frees
    python -m pipeline.prune out               # remove it
    python -m pipeline.prune out --trials      # also the checkpoints of trials no kept row reports

A run uses what its ``results.jsonl`` rows came from: a head folder (``heads/<key>/``) or fine-tune search folder
(``finetune/<key>/``, ``finetune/fewshot-<key>/``) whose stored rows are rows of a run still under ``runs/``, the fits
its rows name (``fit_keys``), and the fits of its fine-tune searches (the same backbone, split seed and manifest):
its trials, kept so that a search can be resumed or widened. A folder that holds no rows yet is a search in progress
and is always kept. A set of report figures (``figures/<hash>/``) is kept while a run folder holds those very
files. Delete run folders first (``rm -r out/runs/<run>``), then prune; the activation store has its own:
``python -m extract.list out/store --prune KEY``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from study.hashing import file_sha256
from study.results import read_rows


def _fingerprint(row: dict) -> tuple:
    """What identifies a row across the run folders and caches it was appended from."""
    return tuple(json.dumps(row.get(k), sort_keys=True) for k in (
        "kind", "backbone", "method", "feature_set", "split_seed", "draw_seed", "seed", "k_per_class", "cache_key",
        "manifest_hash", "test_pred"))


def _stored_rows(folder: Path) -> list[dict] | None:
    """The rows a head or search folder stores, or None when it holds none yet (in progress)."""
    for name in ("rows.jsonl", "rows.json"):
        if (folder / name).is_file():
            try:
                return read_rows(folder / name)
            except (OSError, ValueError):
                return []  # unreadable: nothing vouches for it (the study sets such a file aside and redoes it)
    return None


def _owner(spec: dict) -> tuple:
    """(backbone, split seed, manifest) of a fit's or a search's spec.json: the search a fit belongs to."""
    backbone = spec.get("backbone")
    return (backbone.get("name") if isinstance(backbone, dict) else backbone, spec.get("seed"),
            spec.get("manifest_hash"))


def _spec(folder: Path) -> dict:
    try:
        return json.loads((folder / "spec.json").read_text())
    except (OSError, ValueError):
        return {}


def unused(out: str | Path, *, trials: bool = False) -> list[Path]:
    """The folders under ``out``'s heads/ and finetune/ that no run under ``out/runs`` uses (see the module
    docstring); ``trials``: also the fits that no kept row names and no search in progress may resume."""
    out = Path(out)
    live_rows = [r for run in sorted((out / "runs").glob("*")) if (run / "results.jsonl").is_file()
                 for r in read_rows(run / "results.jsonl")]
    prints = {_fingerprint(r) for r in live_rows}
    named_fits = {k for r in live_rows for k in (r.get("fit_keys") or [])}
    gone, owners, open_owners = [], set(), set()
    for folder in sorted([*(out / "heads").glob("*"), *(out / "finetune").glob("*")]):
        if not folder.is_dir() or folder.name in ("fits",) or folder.name.startswith("."):
            continue
        rows = _stored_rows(folder)
        if rows is None:
            open_owners.add(_owner(_spec(folder)))
        elif any(_fingerprint(r) in prints for r in rows):
            owners.add(_owner(_spec(folder)))
        else:
            gone.append(folder)
    for fit in sorted((out / "finetune" / "fits").glob("*")):
        if not fit.is_dir() or fit.name in named_fits:
            continue
        owner = _owner(_spec(fit))
        if owner in open_owners or (owner in owners and not trials):
            continue
        gone.append(fit)
    return gone + _unused_figures(out)


def _unused_figures(out: Path) -> list[Path]:
    """The report's figure sets (reports/stage.py) whose files no run folder holds any more (a report copied them
    from the set or drew them into it), a malformed set, and temporary folders a killed report left behind."""
    from reports.stage import read_figure_list

    runs = [run for run in sorted((out / "runs").glob("*")) if run.is_dir()]
    gone = []
    for folder in sorted((out / "figures").glob("*")):
        try:
            files = list(read_figure_list(folder).values())
            used = any(all((run / name).is_file() and file_sha256(run / name) == digest for name, digest in files)
                       for run in runs)
        except (OSError, ValueError):
            used = False  # a temporary folder, or a set the report itself would not use
        if not used:
            gone.append(folder)
    return gone


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.prune", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the study's --out folder")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("--trials", action="store_true", help="also remove trial checkpoints no kept row reports "
                   "(a finished search is reused from its rows; widening it retrains its chosen trial)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not (out / "runs").is_dir():
        print(f"error: {out} is not a study's --out folder (it has no runs/ folder)", file=sys.stderr)
        return 2
    folders = unused(out, trials=args.trials)
    total = 0
    for folder in folders:
        size = _size(folder)
        total += size
        print(f"{'would remove' if args.dry_run else 'removed'} {folder} ({size / 2**20:.1f} MiB)")
        if not args.dry_run:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"{len(folders)} folders, {total / 2**20:.1f} MiB {'to free' if args.dry_run else 'freed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
