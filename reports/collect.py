"""Turn a run's ``results.jsonl`` rows into tables: one row per result, one row per (result, class).

Nothing here computes a metric: every number is copied from a row, so each figure in the report
traces back to one line of ``results.jsonl`` (its ``row`` index is kept in both tables).
"""
from __future__ import annotations

import pandas as pd

RESULT_COLUMNS = [
    "row", "kind", "backbone", "method", "feature_set", "tta", "seed", "k_per_class",
    "top1", "top1_lo", "top1_hi", "mean_per_class", "mean_per_class_lo", "mean_per_class_hi",
    "top5", "macro_f1", "macro_f1_lo", "macro_f1_hi",
    "train_s", "predict_s", "feature_s", "trainable_params", "total_params", "epochs_run",
    "n_train", "n_val", "n_test", "hyperparams", "cache_key", "manifest_hash",
]


def _ci(metrics: dict, key: str) -> tuple[float | None, float | None]:
    lo_hi = (metrics.get("ci95") or {}).get(key)
    return (lo_hi[0], lo_hi[1]) if lo_hi else (None, None)


def label(row: dict) -> str:
    """How a result is named in tables and plots, e.g. 'lr (aug)' or 'ft:last:1 (light)'."""
    return f"{row['method']} ({row['feature_set']})"


def results_table(rows: list[dict]) -> pd.DataFrame:
    records = []
    for i, r in enumerate(rows):
        m = r["metrics"]
        rec = {
            "row": i, "kind": r["kind"], "backbone": r["backbone"], "method": r["method"],
            "feature_set": r["feature_set"], "tta": r.get("tta", "none"), "seed": r["seed"],
            "k_per_class": r.get("k_per_class"), "top1": m["top1"], "mean_per_class": m["mean_per_class"], "top5": m.get("top5"),
            "macro_f1": m["macro_f1"],
            "train_s": r["train_s"], "predict_s": r["predict_s"], "feature_s": r.get("feature_s"),
            "trainable_params": r.get("trainable_params"), "total_params": r.get("total_params"),
            "epochs_run": r.get("epochs_run"),
            "n_train": r["n_train"], "n_val": r.get("n_val"), "n_test": r["n_test"],
            "hyperparams": _compact(r.get("hyperparams")), "cache_key": r["cache_key"],
            "manifest_hash": r["manifest_hash"],
        }
        for key in ("top1", "mean_per_class", "macro_f1"):
            rec[f"{key}_lo"], rec[f"{key}_hi"] = _ci(m, key)
        records.append(rec)
    return pd.DataFrame.from_records(records, columns=RESULT_COLUMNS)


def per_class_table(rows: list[dict]) -> pd.DataFrame:
    records = []
    for i, r in enumerate(rows):
        names = r.get("class_names") or []
        for c, acc in enumerate(r["metrics"].get("per_class_acc") or []):
            records.append({"row": i, "kind": r["kind"], "backbone": r["backbone"], "method": r["method"],
                            "feature_set": r["feature_set"], "seed": r["seed"], "label": c,
                            "class_name": names[c] if c < len(names) else str(c), "accuracy": acc})
    return pd.DataFrame.from_records(records, columns=["row", "kind", "backbone", "method", "feature_set", "seed",
                                                       "label", "class_name", "accuracy"])


def _compact(obj) -> str:
    if not obj:
        return ""
    return "; ".join(f"{k}={v}" for k, v in sorted(obj.items()))
