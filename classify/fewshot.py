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
from pathlib import Path

import numpy as np
from tqdm import tqdm

from classify.heads import class_scores
from classify.search import result_row
from classify.selection import HeadData, Rows, concat, refit
from classify.store import cached_rows, head_key, save_rows
from study.console import bars_shown
from study.protocol import draw_indices, smallest_class
from study.results import ResultRow, append_skip, fused_parts


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


def cached_fewshot(params: dict, *, method: str, feature_set: str, data: HeadData, fewshot_cfg: dict, head_cfg: dict,
                   heads_dir: Path, run_dir: Path, job) -> list[ResultRow]:
    """The chosen head (method, settings, feature set) refit on k images per class for each k and draw, each draw
    scored on test; cached in its own ``heads/<key>/`` folder."""
    seed = job.seed
    # Which split seeds draw curves decides whether this one runs, not what it computes.
    settings = {method: head_cfg, "chosen": params,
                "fewshot": {k: v for k, v in fewshot_cfg.items() if k != "split_seeds"}}
    head_dir = Path(heads_dir) / head_key(features_key=job.fs.key, kind="fewshot", method=method,
                                          feature_set=feature_set, settings=settings, seed=seed, n_boot=job.n_boot)
    rows = cached_rows(head_dir)
    if rows is not None:
        return rows
    pool = fewshot_pool(data, pool=fewshot_cfg["pool"])
    rows, largest = [], max_k(pool)
    for k in tqdm(fewshot_cfg["k"], desc=f"few-shot {job.backbone} {method}", unit="k",
                  disable=not bars_shown()):
        if k > largest:
            append_skip(run_dir, stage="classify", what=f"{job.backbone} few-shot k={k}",
                        reason=f"the smallest class has {largest} images in the '{fewshot_cfg['pool']}' pool",
                        fix="lower classify.fewshot.k" + (" or set classify.fewshot.pool='train+val'"
                                                          if fewshot_cfg["pool"] == "train" else ""))
            continue
        for draw_seed in range(seed, seed + fewshot_cfg["seeds"]):
            fit = fit_fewshot(params, method=method, pool=pool, test=data.test, k=k, seed=draw_seed,
                              head_cfg=head_cfg, n_classes=len(job.class_names))
            rows.append(result_row(kind="fewshot", method=method, feature_set=feature_set, data=data, fit=fit,
                                   model=fit.model, hyperparams=params, job=job, draw_seed=draw_seed,
                                   k_per_class=k, n_train=fit.n_train, n_val=0, n_fit=fit.n_train,
                                   n_fit_rows=fit.n_train, fit_on=fewshot_cfg["pool"]))
    save_rows(head_dir, rows)
    return rows
