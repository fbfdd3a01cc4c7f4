"""Head pipelines (scikit-learn) and their hyperparameter grids, built from the ``[classify]`` config.

A head is ``Pipeline([("norm", ...), ("pca", ...), ("clf", ...)])``, so normalisation and PCA are
fitted on the training rows only. A grid point is a flat dict: ``norm`` and ``pca`` (preprocessing)
plus the classifier's own keys (``C``; ``kernel``; ``k``, ``metric``, ``weights``).

SVM choice (measured by ``benchmarks/heads.py`` on EfficientNet-Lite0 features of Caltech 101,
102 classes, 2 CPU cores shared with other jobs): see SVM_CHOICE below; the default grid is the
kernel that won on accuracy per second.
"""
from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ParameterGrid
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

SVM_CHOICE = """(filled in from the benchmark)"""

METHODS = ("lr", "svm", "knn")
PREP_KEYS = ("norm", "pca")
# The classifier parameter swept along a warm-started path (ascending), per method.
PATH_KEY = {"lr": "C", "svm": "C", "knn": "k"}
_GRID_KEYS = {"lr": ("norm", "pca", "C"), "svm": ("norm", "pca", "kernel", "C"),
              "knn": ("norm", "pca", "k", "metric", "weights")}


def head_grid(method: str, head_cfg: dict) -> list[dict]:
    """All grid points of ``method`` from its config table, grouped by preprocessing, path key ascending."""
    if method not in METHODS:
        raise ValueError(f"head {method!r}; allowed: {METHODS}")
    axes = {key: list(head_cfg[key]) for key in _GRID_KEYS[method]}
    points = list(ParameterGrid(axes))
    return sorted(points, key=lambda p: (*(_sort_token(p[k]) for k in _GRID_KEYS[method] if k != PATH_KEY[method]),
                                          p[PATH_KEY[method]]))


def _sort_token(value) -> tuple:
    return (isinstance(value, str), value)


def prep_params(point: dict) -> dict:
    return {k: point[k] for k in PREP_KEYS}


def clf_params(point: dict) -> dict:
    return {k: v for k, v in point.items() if k not in PREP_KEYS}


def make_normaliser(norm: str):
    if norm == "standard":
        return StandardScaler()
    if norm == "l2":
        return Normalizer(norm="l2")
    if norm == "none":
        return FunctionTransformer()
    raise ValueError(f"norm {norm!r}; allowed: standard, l2, none")


def make_preprocessor(point: dict, *, n_rows: int, seed: int) -> Pipeline:
    """Normalisation then optional PCA; PCA is capped at the number of training rows (few-shot fits
    have few), and scikit-learn itself refuses more components than features."""
    steps = [("norm", make_normaliser(point["norm"]))]
    if point["pca"]:
        steps.append(("pca", PCA(n_components=min(point["pca"], n_rows), random_state=seed)))
    return Pipeline(steps)


def make_classifier(method: str, point: dict, *, seed: int, head_cfg: dict, warm_start: bool = False):
    """The classifier of one grid point. ``warm_start`` lets a C path reuse the previous solution."""
    if method == "lr":
        # lbfgs on several classes fits the multinomial (softmax) loss.
        return LogisticRegression(C=point["C"], solver="lbfgs", max_iter=head_cfg["max_iter"], tol=head_cfg["tol"],
                                  warm_start=warm_start, random_state=seed)
    if method == "svm":
        if point["kernel"] == "linear":
            return LinearSVC(C=point["C"], dual="auto", max_iter=5000, random_state=seed)
        return SVC(C=point["C"], kernel="rbf", gamma="scale", decision_function_shape="ovr", random_state=seed)
    if method == "knn":
        return KNeighborsClassifier(n_neighbors=point["k"], metric=point["metric"], weights=point["weights"],
                                    algorithm="brute")
    raise ValueError(f"head {method!r}; allowed: {METHODS}")


def make_pipeline(method: str, point: dict, *, seed: int, head_cfg: dict, n_rows: int) -> Pipeline:
    prep = make_preprocessor(point, n_rows=n_rows, seed=seed)
    clf = make_classifier(method, point, seed=seed, head_cfg=head_cfg)
    if method == "knn":
        clf.set_params(n_neighbors=min(point["k"], n_rows))
    return Pipeline([*prep.steps, ("clf", clf)])


def class_scores(model, X: np.ndarray, *, n_classes: int) -> np.ndarray:
    """Scores (N x n_classes) in label order, whichever classes the model saw in training."""
    clf = model[-1] if isinstance(model, Pipeline) else model
    raw = model.predict_proba(X) if hasattr(clf, "predict_proba") else model.decision_function(X)
    raw = raw if raw.ndim == 2 else np.column_stack([-raw, raw])  # binary decision_function is 1-D
    scores = np.full((len(X), n_classes), -np.inf if not hasattr(clf, "predict_proba") else 0.0)
    scores[:, clf.classes_] = raw
    return scores


def probabilities(model, X: np.ndarray, *, n_classes: int) -> tuple[np.ndarray, bool]:
    """Class probabilities, and whether they are calibrated model outputs (LR, kNN) or a softmax of
    SVM decision values (a ranking, not a probability)."""
    scores = class_scores(model, X, n_classes=n_classes)
    clf = model[-1] if isinstance(model, Pipeline) else model
    if hasattr(clf, "predict_proba"):
        return scores, True
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True), False


def count_parameters(model) -> int:
    """Learnt numbers of the classifier (coefficients + intercepts; an RBF SVM's dual coefficients;
    0 for kNN, which stores its training rows instead of learning parameters)."""
    clf = model[-1] if isinstance(model, Pipeline) else model
    if isinstance(clf, KNeighborsClassifier):
        return 0
    if isinstance(clf, SVC):
        return int(clf.dual_coef_.size + clf.intercept_.size)
    return int(clf.coef_.size + np.size(clf.intercept_))
