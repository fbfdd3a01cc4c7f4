"""The ``results.jsonl`` row: the one schema that heads and fine-tuning write and reports read.

A row is a flat JSON object. Required keys (``REQUIRED_KEYS``) are checked on write so that a
stage cannot emit a row the report cannot read:

- ``kind``: "head" | "finetune" | "fewshot"
- ``backbone``: registry name, e.g. "efficientnet_lite0"
- ``method``: e.g. "lr", "svm", "knn", "ft:head", "ft:last:1"
- ``feature_set``: "clean" | "aug" (heads: which training rows; fine-tune: augmentation policy name)
- ``seed``: int; ``k_per_class``: int or null (few-shot rows)
- ``metrics``: dict from ``classify.metrics.evaluate`` (top1, top5, mean_per_class, macro_f1,
  ``ci95`` {metric: [lo, hi]}, per_class_acc, confusion)
- ``test_sample_id`` / ``test_pred``: per-test-sample predictions, manifest order (for McNemar)
- ``hyperparams``: chosen hyperparameters; ``selection``: the val scores of the sweep
- ``train_s``, ``predict_s``: wall seconds; ``trainable_params``, ``total_params``: ints or null
- ``cache_key``, ``manifest_hash``: what the numbers were computed from
- ``n_train``, ``n_val``, ``n_test``, ``class_names``
"""
from __future__ import annotations

import json
from pathlib import Path

REQUIRED_KEYS = (
    "kind", "backbone", "method", "feature_set", "seed", "metrics", "hyperparams",
    "train_s", "predict_s", "cache_key", "manifest_hash", "n_train", "n_test",
)
KINDS = ("head", "finetune", "fewshot")


def check_row(row: dict) -> dict:
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"results row is missing keys {missing}; it has {sorted(row)}")
    if row["kind"] not in KINDS:
        raise ValueError(f"results row kind {row['kind']!r}; allowed: {KINDS}")
    return row


def append_rows(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(check_row(r), sort_keys=True) + "\n" for r in rows)
    with open(path, "a") as f:
        f.write(lines)
        f.flush()


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n} is not a JSON line: {exc}") from exc
    return rows


def append_skip(run_dir: str | Path, *, stage: str, what: str, reason: str, fix: str = "") -> dict:
    """Record work a run could not do (missing weights, a dropped class...) so the report lists it."""
    row = {"stage": stage, "what": what, "reason": reason, "fix": fix}
    path = Path(run_dir) / "skipped.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    return row


def read_skips(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "skipped.jsonl"
    return read_rows(path) if path.is_file() else []
