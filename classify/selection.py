"""Model selection that cannot see test rows: sweep on train, score on val, refit on train+val.

The split is structural. ``sweep`` and ``refit`` receive only ``Rows`` of train and val; the one
function that holds test rows, ``select_and_refit``, passes them to nothing but the final
``predict``. Selection scores each grid point by mean per-class accuracy on clean val rows. Val is
small (5 images per class on Caltech), so accuracies often tie; ties go to the lower val log-loss
where the head gives probabilities (LR, kNN), else to the earlier grid point (smaller C / k).

The sweep fits each preprocessing (normalisation, PCA) once on train and walks the classifier's
path key in ascending order with a warm-started estimator: each C starts from the previous
solution, which is what makes the LR sweep fast.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import groupby

import numpy as np
from sklearn.metrics import log_loss

from classify.heads import class_scores, clf_params, make_classifier, make_pipeline, make_preprocessor, prep_params
from study.metrics import mean_per_class_accuracy
from study.results import Point, Selection


@dataclass(frozen=True)
class Rows:
    """Feature rows of one split (or a union of splits), with labels and sample ids."""
    X: np.ndarray
    y: np.ndarray
    sample_id: np.ndarray

    def __post_init__(self):
        if not (len(self.X) == len(self.y) == len(self.sample_id)):
            raise ValueError(f"Rows: {len(self.X)} feature rows, {len(self.y)} labels, {len(self.sample_id)} ids")

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index) -> "Rows":
        return Rows(self.X[index], self.y[index], self.sample_id[index])


def concat(*parts: Rows) -> Rows:
    return Rows(np.concatenate([p.X for p in parts]), np.concatenate([p.y for p in parts]),
                np.concatenate([p.sample_id for p in parts]))


@dataclass(frozen=True)
class HeadData:
    """What one head needs: rows to fit during selection, clean val rows to score it, the val rows
    added for the refit (clean, or clean + augmented views), and clean test rows."""
    train: Rows
    val: Rows
    val_fit: Rows
    test: Rows


def sweep(method: str, grid: list[dict], *, train: Rows, val: Rows, seed: int, head_cfg: dict) -> Selection:
    """Fit every grid point on ``train``, score on ``val``; every point's scores and the chosen one, grid order."""
    points = []
    for _, group in groupby(grid, key=lambda p: tuple(sorted(prep_params(p).items()))):
        group = list(group)
        prep = make_preprocessor(group[0], n_rows=len(train), seed=seed).fit(train.X)
        X_train, X_val = prep.transform(train.X), prep.transform(val.X)
        for point, clf in _path(method, group, seed=seed, head_cfg=head_cfg, n_rows=len(train)):
            clf.fit(X_train, train.y)
            score = mean_per_class_accuracy(val.y, clf.predict(X_val))
            points.append(Point(params=point, val_mean_per_class=score, val_log_loss=_log_loss(clf, X_val, val.y)))
    # A missing log-loss (SVM) ranks every tie equal: the earlier point (smaller C) is chosen.
    return Selection.of(points)


def _log_loss(clf, X_val: np.ndarray, y_val: np.ndarray) -> float | None:
    if not hasattr(clf, "predict_proba"):
        return None
    return float(log_loss(y_val, clf.predict_proba(X_val), labels=clf.classes_))


def _path(method: str, points: list[dict], *, seed: int, head_cfg: dict, n_rows: int):
    """Yield (point, estimator): LR reuses one warm-started estimator along C; the rest fit fresh."""
    warm = None
    for point in points:
        params = clf_params(point)
        if method == "lr":
            if warm is None:
                warm = make_classifier(method, point, seed=seed, head_cfg=head_cfg, warm_start=True)
            yield point, warm.set_params(C=params["C"])
        else:
            clf = make_classifier(method, point, seed=seed, head_cfg=head_cfg)
            if method == "knn":
                clf.set_params(n_neighbors=min(params["k"], n_rows))
            yield point, clf


def refit(method: str, point: dict, *, rows: Rows, seed: int, head_cfg: dict):
    """The chosen pipeline, fitted from scratch on ``rows`` (train + val)."""
    return make_pipeline(method, point, seed=seed, head_cfg=head_cfg, n_rows=len(rows)).fit(rows.X, rows.y)


@dataclass(frozen=True)
class HeadFit:
    model: object
    selection: Selection
    train_s: float
    predict_s: float
    test_pred: np.ndarray
    test_scores: np.ndarray


def select_and_refit(method: str, grid: list[dict], *, data: HeadData, seed: int, head_cfg: dict,
                     n_classes: int) -> HeadFit:
    """Select on val, refit on train+val, then -- and only then -- predict test once."""
    t0 = time.perf_counter()
    selection = sweep(method, grid, train=data.train, val=data.val, seed=seed, head_cfg=head_cfg)
    model = refit(method, selection.best.params, rows=concat(data.train, data.val_fit), seed=seed, head_cfg=head_cfg)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = class_scores(model, data.test.X, n_classes=n_classes)
    pred = model.predict(data.test.X)
    return HeadFit(model=model, selection=selection, train_s=train_s, predict_s=time.perf_counter() - t1,
                   test_pred=np.asarray(pred, dtype=np.int64), test_scores=scores)
