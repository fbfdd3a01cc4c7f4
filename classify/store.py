"""Fitted heads and their result rows on disk, keyed by a spec hash.

``heads/<key>/`` holds ``head.joblib`` (the fitted Pipeline), ``meta.json`` (backbone name and spec,
class names, features cache key, chosen hyperparameters, and the sha256 of ``head.joblib``) and
``rows.jsonl`` (the result rows the fit produced). A head search's key (classify/search.py ``search_key``)
hashes everything its numbers depend on: the content identity of every feature set it may read, the
methods, the declared space, the budget and sampler seed, the split seed, the bootstrap count and the
scikit-learn version; a few-shot curve's (``head_key``) the chosen head and the draws. So a change re-fits
only what it changes, and a rerun re-appends the stored rows without fitting. ``rows.jsonl`` is written last:
a head dir without it is an interrupted fit and is redone; so is one whose model or meta.json is missing,
truncated or altered (a warning says so) -- a rerun restores the head instead of reusing it half-present.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import joblib
import sklearn

from study.atomic import atomic_path, write_text_atomic
from study.errors import StudyError
from study.hashing import canonical_json, spec_hash
from study.results import ResultRow, read_rows, rows_text

MODEL_FILE, META_FILE, ROWS_FILE = "head.joblib", "meta.json", "rows.jsonl"
# Bump when the rows or the fitting code change in a way that changes the numbers.
FORMAT_VERSION = 2  # 2: head searches (tuner trials, cross-validated when val is small)
log = logging.getLogger(__name__)


class HeadDamaged(StudyError):
    """A saved head folder whose model or meta.json is missing, truncated or altered."""


def head_key(*, features_key: str, kind: str, method: str, feature_set: str, settings: dict, seed: int,
             n_boot: int) -> str:
    return spec_hash({"features_key": features_key, "kind": kind, "method": method, "feature_set": feature_set,
                      "settings": settings, "seed": seed, "n_boot": n_boot, "sklearn": sklearn.__version__,
                      "format": FORMAT_VERSION})


def cached_rows(head_dir: Path) -> list[ResultRow] | None:
    """The stored rows of a completed fit, or None if there is none (interrupted, or the head is damaged)."""
    head_dir = Path(head_dir)
    path = head_dir / ROWS_FILE
    if not path.is_file():
        return None
    try:
        rows = [ResultRow.from_dict(r) for r in read_rows(path)]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        problems = [f"{ROWS_FILE} is unreadable ({exc})"]
    else:
        problems = head_problems(head_dir) if any(r.kind == "head" for r in rows) else []
    if not problems:
        return rows
    log.warning("head %s is damaged (%s): fitting it again", head_dir, "; ".join(problems))
    path.unlink(missing_ok=True)  # the rows are written last: without them the folder is an unfinished fit
    return None


def save_rows(head_dir: Path, rows: list[ResultRow]) -> None:
    write_text_atomic(Path(head_dir) / ROWS_FILE, rows_text(rows))


def save_head(head_dir: Path, *, model, meta: dict) -> None:
    head_dir = Path(head_dir)
    with atomic_path(head_dir / MODEL_FILE) as tmp:
        joblib.dump(model, tmp)
        digest = _sha256(tmp)
    meta = {**json.loads(canonical_json(meta)), "model_sha256": digest}
    write_text_atomic(head_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))


def head_problems(head_dir: str | Path) -> list[str]:
    """What makes ``head_dir`` unusable as a saved head (empty when its model and meta.json are whole)."""
    head_dir = Path(head_dir)
    missing = [f for f in (MODEL_FILE, META_FILE) if not (head_dir / f).is_file()]
    if missing:
        return [f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"]
    try:
        meta = json.loads((head_dir / META_FILE).read_text())
        if not isinstance(meta, dict) or "class_names" not in meta:
            raise ValueError("it has no class_names")
    except (OSError, ValueError) as exc:
        return [f"{META_FILE} is unreadable ({exc})"]
    expected = meta.get("model_sha256")
    if expected is None:  # written before heads were sealed: the model must at least load
        try:
            joblib.load(head_dir / MODEL_FILE)
        except Exception as exc:  # noqa: BLE001 -- unpickling a damaged file can raise almost anything
            return [f"{MODEL_FILE} does not load ({type(exc).__name__}: {exc})"]
    elif _sha256(head_dir / MODEL_FILE) != expected:
        return [f"{MODEL_FILE} does not match the sha256 in {META_FILE} (truncated or altered)"]
    return []


def load_head(head_dir: str | Path) -> tuple[object, dict]:
    head_dir = Path(head_dir)
    if not head_dir.is_dir():
        raise FileNotFoundError(f"{head_dir} is not a folder; heads live in <out>/heads/<key>/ after the classify "
                                "stage")
    problems = head_problems(head_dir)
    if problems:
        raise HeadDamaged(f"{head_dir} is not a usable saved head: {'; '.join(problems)}. Rerun the classify stage "
                          "with the same config and --out to fit it again (a damaged head is refit), or pass "
                          "another <out>/heads/<key>/ folder")
    meta = json.loads((head_dir / META_FILE).read_text())
    try:
        model = joblib.load(head_dir / MODEL_FILE)
    except Exception as exc:  # noqa: BLE001
        raise HeadDamaged(f"{head_dir / MODEL_FILE} does not load ({type(exc).__name__}: {exc}); rerun the "
                          "classify stage with the same config and --out to fit it again") from exc
    return model, meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
