"""Fitted heads and their result rows on disk, keyed by a spec hash.

``heads/<key>/`` holds ``head.joblib`` (the fitted Pipeline), ``meta.json`` (backbone name and spec,
class names, features cache key, chosen hyperparameters) and ``rows.jsonl`` (the result rows the
fit produced). The key hashes everything that changes the numbers: the features cache key, the
head's method, feature set and its own config table, the seed, the bootstrap count and the
scikit-learn version -- so changing one head's settings re-fits that head only, and a rerun
re-appends the stored rows without fitting. ``rows.jsonl`` is written last: a head dir without it
is an interrupted fit and is redone.
"""
from __future__ import annotations

import json
from pathlib import Path

import joblib
import sklearn

from study.atomic import atomic_path, write_text_atomic
from study.hashing import canonical_json, spec_hash
from study.results import check_row, read_rows

MODEL_FILE, META_FILE, ROWS_FILE = "head.joblib", "meta.json", "rows.jsonl"
# Bump when the rows or the fitting code change in a way that changes the numbers.
FORMAT_VERSION = 1


def head_key(*, features_key: str, kind: str, method: str, feature_set: str, settings: dict, seed: int,
             n_boot: int) -> str:
    return spec_hash({"features_key": features_key, "kind": kind, "method": method, "feature_set": feature_set,
                      "settings": settings, "seed": seed, "n_boot": n_boot, "sklearn": sklearn.__version__,
                      "format": FORMAT_VERSION})


def cached_rows(head_dir: Path) -> list[dict] | None:
    """The stored rows of a completed fit, or None if there is none (or it was interrupted)."""
    path = Path(head_dir) / ROWS_FILE
    return read_rows(path) if path.is_file() else None


def save_rows(head_dir: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(check_row(r), sort_keys=True) + "\n" for r in rows)
    write_text_atomic(Path(head_dir) / ROWS_FILE, text)


def save_head(head_dir: Path, *, model, meta: dict) -> None:
    head_dir = Path(head_dir)
    head_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(head_dir / MODEL_FILE) as tmp:
        joblib.dump(model, tmp)
    write_text_atomic(head_dir / META_FILE, json.dumps(json.loads(canonical_json(meta)), indent=2, sort_keys=True))


def load_head(head_dir: str | Path) -> tuple[object, dict]:
    head_dir = Path(head_dir)
    missing = [f for f in (MODEL_FILE, META_FILE) if not (head_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{head_dir} is not a saved head: it lacks {missing}; heads live in <out>/heads/<key>/ "
                                "after the classify stage")
    meta = json.loads((head_dir / META_FILE).read_text())
    return joblib.load(head_dir / MODEL_FILE), meta
