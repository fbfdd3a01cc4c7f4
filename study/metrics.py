"""Metrics shared by heads and fine-tuning: the numbers every results row carries.

``evaluate`` returns top-1, top-5, mean per-class accuracy (Caltech's headline metric), macro-F1,
per-class accuracy, the confusion matrix, and percentile-bootstrap 95% intervals over test
samples (resampled with a seeded generator; the same resamples serve every metric).
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix


def mean_per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, *, n_classes: int | None = None) -> float:
    """Mean over the classes present in ``y_true`` of that class's recall."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(y_true)
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in present]))


def _top_k_hits(y_true: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    return np.any(top == np.asarray(y_true)[:, None], axis=1)


def top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    return float(np.mean(_top_k_hits(y_true, scores, k)))


def _from_counts(correct: np.ndarray, correct5: np.ndarray | None, y_true: np.ndarray, y_pred: np.ndarray,
                 n_classes: int) -> dict:
    """Point metrics from per-sample correctness and labels; O(N) with bincount, so bootstrap is cheap."""
    support = np.bincount(y_true, minlength=n_classes)
    tp = np.bincount(y_true, weights=correct, minlength=n_classes)
    predicted = np.bincount(y_pred, minlength=n_classes)
    present = support > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return {
        "top1": float(correct.mean()),
        "top5": None if correct5 is None else float(correct5.mean()),
        "mean_per_class": float(np.mean(tp[present] / support[present])),
        "macro_f1": float(np.mean(f1)),
    }


def bootstrap_ci(correct, correct5, y_true, y_pred, *, n_classes: int, n_boot: int, seed: int,
                 alpha: float = 0.05) -> dict:
    """Percentile bootstrap interval for each point metric, over test samples."""
    if n_boot <= 0:
        return {}
    rng = np.random.default_rng(seed)
    n = len(y_true)
    draws: dict[str, list] = {"top1": [], "top5": [], "mean_per_class": [], "macro_f1": []}
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        m = _from_counts(correct[idx], None if correct5 is None else correct5[idx], y_true[idx], y_pred[idx],
                         n_classes)
        for key, value in m.items():
            if value is not None:
                draws[key].append(value)
    return {k: [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))]
            for k, v in draws.items() if v}


def evaluate(y_true, y_pred, scores=None, *, n_classes: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """All metrics for one model on one test set. ``scores`` (N x C) enables top-5."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    scores = None if scores is None else np.asarray(scores)
    if len(y_true) != len(y_pred) or (scores is not None and scores.shape != (len(y_true), n_classes)):
        raise ValueError(f"evaluate: {len(y_true)} labels, {len(y_pred)} predictions, scores "
                         f"{None if scores is None else scores.shape}; expected scores ({len(y_true)}, {n_classes})")
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))
    support = cm.sum(axis=1)
    per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    correct = (y_true == y_pred).astype(np.float64)
    correct5 = None if scores is None else _top_k_hits(y_true, scores, 5).astype(np.float64)
    point = _from_counts(correct, correct5, y_true, y_pred, n_classes)
    return {
        **point,
        "ci95": bootstrap_ci(correct, correct5, y_true, y_pred, n_classes=n_classes, n_boot=n_boot, seed=seed),
        "per_class_acc": [None if np.isnan(v) else float(v) for v in per_class],
        "confusion": cm.tolist(),
        "n_boot": n_boot,
    }
