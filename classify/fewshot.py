"""Few-shot curve: the val-chosen head refit on k labelled images per class, scored on the same clean test set.

The head (method, hyperparameters, feature set) is the one the full-data protocol chose on val over
every backbone and feature set; its settings are not re-selected per k (with k = 1 there would be
nothing left to select on). Because nothing is selected, val is free to join the pool the k images
are drawn from (``classify.fewshot.pool``), which makes k = 30 Caltech's standard 30-per-class
protocol. Draws are seeded (seed, seed+1, ...) and sample images, not views: a drawn image brings
the rows its feature set fits on (its augmented views too, for ``aug``). The fine-tune arm draws
the same images with the same seeds (``draw_indices``), see finetune/fewshot.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from classify.heads import class_scores
from classify.selection import HeadData, Rows, concat, refit
from study.protocol import draw_indices, smallest_class
from study.results import ResultRow, fused_parts


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


def like_for_like(rows: list[ResultRow], config: dict) -> list[ResultRow]:
    """The head rows the few-shot curve may choose from: with the fine-tune arm on fewer backbones
    (``finetune.backbones``), only heads on those backbones' features (a fused set only when all its parts
    are fine-tuned), so the two arms' curves differ in how the features are used, not in which network made
    them; every row when the arms cover the same backbones or none is left."""
    tuned = config.get("finetune", {}).get("backbones") or []
    if not tuned or "finetune" not in config.get("stages", ()):
        return rows
    kept = [r for r in rows if set(fused_parts(r.backbone)) <= set(tuned)]
    return kept or rows


def draw_per_class(rows: Rows, *, k: int, seed: int) -> np.ndarray:
    """Indices of every row of ``k`` images of every class (an image's augmented views come with it)."""
    ids, first = np.unique(rows.sample_id, return_index=True)
    first = np.sort(first)  # images in the order they first appear: manifest order, train then val
    picked = rows.sample_id[first[draw_indices(rows.y[first], k=k, seed=seed)]]
    return np.flatnonzero(np.isin(rows.sample_id, picked))


def fewshot_pool(data: HeadData, *, pool: str) -> Rows:
    """The labelled rows to draw images from: train (and val's, for ``train+val``) rows of the feature set
    the head fits on (``clean``: one per image; ``aug``: each image with its augmented views)."""
    return concat(data.train, data.val_fit) if pool == "train+val" else data.train


def max_k(pool: Rows) -> int:
    ids, first = np.unique(pool.sample_id, return_index=True)
    return smallest_class(pool.y[first])


def fit_fewshot(point: dict, *, method: str = "lr", pool: Rows, test: Rows, k: int, seed: int, head_cfg: dict,
                n_classes: int) -> FewShotFit:
    t0 = time.perf_counter()
    rows = pool.take(draw_per_class(pool, k=k, seed=seed))
    model = refit(method, point, rows=rows, seed=seed, head_cfg=head_cfg)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = class_scores(model, test.X, n_classes=n_classes)
    pred = model.predict(test.X)
    n_images = len(np.unique(rows.sample_id))
    return FewShotFit(k_per_class=k, seed=seed, n_train=n_images, test_pred=np.asarray(pred, dtype=np.int64),
                      test_scores=scores, train_s=train_s, predict_s=time.perf_counter() - t1, model=model)
