"""Few-shot curve: LR refit on k labelled images per class, scored on the same clean test set.

The hyperparameters (normalisation, PCA, C) are the ones the full-data LR head chose on val; they
are not re-selected per k (with k = 1 there would be nothing left to select on). Because nothing is
selected, val is free to join the pool the k images are drawn from (``classify.fewshot.pool``),
which makes k = 30 Caltech's standard 30-per-class protocol. Draws are seeded (seed, seed+1, ...)
and sample images, not views: all clean view-0 rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from classify.heads import class_scores
from classify.selection import HeadData, Rows, concat, refit


@dataclass(frozen=True)
class FewShotFit:
    k_per_class: int
    seed: int
    n_train: int
    test_pred: np.ndarray
    test_scores: np.ndarray
    train_s: float
    predict_s: float
    model: object


def draw_per_class(rows: Rows, *, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` rows of every class, drawn without replacement with a seeded generator."""
    rng = np.random.default_rng(seed)
    picks = []
    for label in np.unique(rows.y):
        members = np.flatnonzero(rows.y == label)
        if len(members) < k:
            raise ValueError(f"few-shot k={k}: class {label} has only {len(members)} images in the pool")
        picks.append(np.sort(rng.choice(members, size=k, replace=False)))
    return np.concatenate(picks)


def fewshot_pool(clean: HeadData, *, pool: str) -> Rows:
    """The labelled images to draw from, from the ``clean`` feature set's rows (one row per image)."""
    if len(np.unique(clean.train.sample_id)) != len(clean.train):
        raise ValueError("few-shot draws images: pass the 'clean' feature set's HeadData (one row per image)")
    return concat(clean.train, clean.val) if pool == "train+val" else clean.train


def max_k(pool: Rows) -> int:
    return int(np.bincount(pool.y)[np.unique(pool.y)].min())


def fit_fewshot(point: dict, *, pool: Rows, test: Rows, k: int, seed: int, head_cfg: dict,
                n_classes: int) -> FewShotFit:
    t0 = time.perf_counter()
    rows = pool.take(draw_per_class(pool, k=k, seed=seed))
    model = refit("lr", point, rows=rows, seed=seed, head_cfg=head_cfg)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = class_scores(model, test.X, n_classes=n_classes)
    pred = model.predict(test.X)
    return FewShotFit(k_per_class=k, seed=seed, n_train=len(rows), test_pred=np.asarray(pred, dtype=np.int64),
                      test_scores=scores, train_s=train_s, predict_s=time.perf_counter() - t1, model=model)
