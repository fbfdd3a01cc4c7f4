"""Head pipelines (scikit-learn), built from one point of the head arm's search (classify/search.py).

A head is ``Pipeline([("power", ...), ("norm", ...), ("pca", ...), ("clf", ...)])``, so normalisation
and PCA are fitted on the training rows only. A point is a flat dict: ``power``, ``norm`` and ``pca``
(preprocessing) plus the classifier's own keys (``C``; ``kernel``; ``k``, ``metric``, ``weights``), drawn
by the tuner from ``[tune.head]`` (study/tune.py).

``power`` is signed power normalisation, ``sign(x) * |x| ** power`` per coordinate (Perronnin et al.
2010, "Improving the Fisher kernel"): pooled CNN features are sparse and heavy-tailed (Lite0 on
Caltech: 45% zeros, a few coordinates up to 6), and a square root evens out the bursty ones before
scaling. Measured on Lite0 features of Caltech 101 with the earlier grid sweeps, ``power=0.5`` raised the
best val mean per-class accuracy of every LR setting (standard: 0.916 -> 0.920; l2: 0.912 -> 0.914).

SVM choice, measured on Lite0 features of Caltech 101 (train/val of 65 classes: 1625 train, 325
val rows; standardised; one BLAS thread; the 2-core box shared with other jobs), per fit:

    liblinear LinearSVC, dual='auto'      a 12-point C sweep had not finished after 3 min (stopped)
    liblinear LinearSVC, dual             11 s (C=1e-4) .. 104 s (C=1e-2); best val 0.929
    libsvm SVC linear kernel              6.6-7.6 s per C;  best val 0.929 (C=1e-3)
    libsvm SVC RBF kernel (gamma=scale)   7.3-8.2 s per C;  best val 0.914 (C=10)
    SVC on a BLAS Gram matrix (GramSVC)   0.4-0.5 s per C;  the same val accuracy at every C

On the full set (102 classes, 2550 train / 510 val / 6085 test, GramSVC, clean features, one BLAS
thread, shared box) the earlier grid sweeps of the two kernels took 7.4 s (linear, 12 points, best val
0.906, test 0.911) and 9.3 s (RBF, 10 points, best val 0.902, test 0.920). Val preferred linear, and val
is what chooses, so the default space offers the linear kernel only; add "rbf" to
``tune.head.svm_kernel`` (and let ``svm_C`` reach 1-10) to let val choose between them.
"""
from __future__ import annotations

import contextlib

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import SVC
from sklearn.svm._base import _one_vs_one_coef  # private, as SVC.coef_ builds it
from threadpoolctl import threadpool_limits

METHODS = ("lr", "svm", "knn")


def blas_threads(n: int):
    """A scope with ``n`` BLAS threads for head fitting (0 leaves the library default); not global."""
    return threadpool_limits(limits=n, user_api="blas") if n else contextlib.nullcontext()


def scale_by_sqrt_dim(X: np.ndarray) -> np.ndarray:
    """Unit-length rows times sqrt(D): every coordinate has RMS 1, the scale StandardScaler gives,
    so one C range suits both normalisations."""
    return X * np.sqrt(X.shape[1]).astype(X.dtype)


def make_normaliser(norm: str):
    if norm == "standard":
        return StandardScaler()
    if norm == "l2":
        return Pipeline([("unit", Normalizer(norm="l2")), ("rescale", FunctionTransformer(scale_by_sqrt_dim))])
    if norm == "none":
        return FunctionTransformer()
    raise ValueError(f"norm {norm!r}; allowed: standard, l2, none")


def signed_power(X: np.ndarray, power: float) -> np.ndarray:
    return np.sign(X) * np.abs(X) ** np.asarray(power, dtype=X.dtype)


def make_power(power: float):
    if not 0.0 < power <= 1.0:
        raise ValueError(f"power {power!r}; allowed: 0 < power <= 1 (1 = unchanged, 0.5 = signed square root)")
    if power == 1.0:
        return FunctionTransformer()
    return FunctionTransformer(signed_power, kw_args={"power": float(power)})


def make_preprocessor(point: dict, *, n_rows: int, seed: int) -> Pipeline:
    """Signed power, normalisation, then optional PCA; PCA is capped at the number of training rows
    (few-shot fits have few), and scikit-learn itself refuses more components than features.
    A point without ``power`` (a head saved before that axis existed) means power 1."""
    steps = [("power", make_power(point.get("power", 1.0))), ("norm", make_normaliser(point["norm"]))]
    if point["pca"]:
        steps.append(("pca", PCA(n_components=min(point["pca"], n_rows), random_state=seed)))
    return Pipeline(steps)


def make_classifier(method: str, point: dict, *, seed: int, head_cfg: dict):
    """The classifier of one point; ``head_cfg`` is logistic regression's solver table (``classify.lr``)."""
    if method == "lr":
        # lbfgs on several classes fits the multinomial (softmax) loss.
        return LogisticRegression(C=point["C"], solver="lbfgs", max_iter=head_cfg["max_iter"], tol=head_cfg["tol"],
                                  random_state=seed)
    if method == "svm":
        return GramSVC(C=point["C"], kernel=point["kernel"], random_state=seed)
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


def used_settings(point: dict, model: Pipeline) -> dict:
    """``point`` as the fitted ``model`` honoured it: kNN's k and PCA's components are capped at the training rows
    (``make_pipeline``), and a row records the value its numbers came from, not the one asked for."""
    used = dict(point)
    if "k" in used and isinstance(model[-1], KNeighborsClassifier):
        used["k"] = int(model[-1].n_neighbors)
    if used.get("pca") and "pca" in model.named_steps:
        used["pca"] = int(model.named_steps["pca"].n_components)
    return used


class GramSVC(ClassifierMixin, BaseEstimator):
    """libsvm's SVC (one-vs-one) on a kernel matrix computed with BLAS.

    SVC computes kernel entries in its own scalar loop; on 1280-d features that loop is the whole
    cost. Handing it a precomputed Gram matrix gives the same solutions ~15x faster (see the module
    docstring). ``gamma`` of the RBF kernel is scikit-learn's "scale": 1 / (D * Var(X)).
    Only the support vectors are kept for prediction.

    With the linear kernel and more than two classes, prediction uses the primal weights of the
    one-vs-one classifiers (``coef_``, as scikit-learn's SVC builds them): one BLAS product instead of
    libsvm's per-pair sums over a dense test Gram matrix, whose build and scan were most of a head's
    predict time on 127 classes (8,001 pairs); libsvm's vote (ties to the lower class) is kept.
    """

    def __init__(self, C: float = 1.0, kernel: str = "linear", random_state: int | None = None):
        self.C = C
        self.kernel = kernel
        self.random_state = random_state

    def _gram(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        inner = A @ B.T
        if self.kernel == "linear":
            return inner.astype(np.float64)
        sq = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2 * inner
        return np.exp(-self.gamma_ * np.maximum(sq, 0)).astype(np.float64)

    def fit(self, X, y):
        if self.kernel not in ("linear", "rbf"):
            raise ValueError(f"GramSVC kernel {self.kernel!r}; allowed: linear, rbf")
        X = np.asarray(X, dtype=np.float32)
        self.gamma_ = float(1.0 / (X.shape[1] * X.var())) if self.kernel == "rbf" else None
        self.svc_ = SVC(kernel="precomputed", C=self.C, decision_function_shape="ovr",
                        random_state=self.random_state).fit(self._gram(X, X), y)
        self.support_vectors_ = X[self.svc_.support_]
        self.n_fit_rows_ = len(X)
        self.classes_ = self.svc_.classes_
        return self

    def _primal(self) -> tuple | None:
        """(one-vs-one weights, pair classes, pair-to-class signs) of a linear multi-class fit, built at the
        first prediction and never pickled (a saved head stays its support vectors: 8,001 x 1,280 float32
        weights are 41 MB); None where libsvm predicts (RBF, two classes)."""
        if self.kernel != "linear" or len(self.classes_) <= 2:
            return None
        if getattr(self, "_primal_cache", None) is None:
            # libsvm keeps the support vectors grouped by class, in the order of dual_coef_'s columns.
            coef = np.vstack(_one_vs_one_coef(self.svc_.dual_coef_, self.svc_.n_support_, self.support_vectors_))
            n = len(self.classes_)
            pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
            sign = np.zeros((len(pairs), n), dtype=np.float32)
            sign[np.arange(len(pairs)), pairs[:, 0]] = 1.0
            sign[np.arange(len(pairs)), pairs[:, 1]] = -1.0
            self._primal_cache = (coef.astype(np.float32), pairs, sign)
        return self._primal_cache

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_primal_cache", None)
        return state

    def _test_gram(self, X) -> np.ndarray:
        # libsvm reads only the support columns; the others may stay zero.
        K = np.zeros((len(X), self.n_fit_rows_))
        K[:, self.svc_.support_] = self._gram(np.asarray(X, dtype=np.float32), self.support_vectors_)
        return K

    def _ovo(self, X) -> np.ndarray:
        """libsvm's one-vs-one decision values (pair (i, j) > 0 votes for i), from the primal weights."""
        coef = self._primal()[0]
        return np.asarray(X, dtype=np.float32) @ coef.T + self.svc_.intercept_.astype(np.float32)

    def _chunks(self, X, fn) -> np.ndarray:
        # 8,001 pairs x 512 rows: ~16 MB of decision values and ~33 MB of int64 winners per slice.
        return np.concatenate([fn(X[lo:lo + 512]) for lo in range(0, len(X), 512)]) if len(X) else fn(X)

    def _votes(self, dec: np.ndarray, *, ties_to_first: bool) -> np.ndarray:
        pairs, n = self._primal()[1], len(self.classes_)
        wins = np.where(dec >= 0 if ties_to_first else dec > 0, pairs[:, 0], pairs[:, 1])
        flat = (np.arange(len(wins))[:, None] * n + wins).ravel()
        return np.bincount(flat, minlength=len(wins) * n).reshape(len(wins), n)

    def _ovr(self, X) -> np.ndarray:
        # scikit-learn's _ovr_decision_function (votes plus bounded summed confidences), with its loop
        # over the 8,001 pairs as one product with the +1/-1 pair-to-class matrix.
        dec = self._ovo(X)
        confidence = dec @ self._primal()[2]
        return self._votes(dec, ties_to_first=True) + confidence / (3 * (np.abs(confidence) + 1))

    def decision_function(self, X) -> np.ndarray:
        if self._primal() is None:
            return self.svc_.decision_function(self._test_gram(X))
        return self._chunks(X, self._ovr)

    def predict(self, X) -> np.ndarray:
        if self._primal() is None:
            return self.svc_.predict(self._test_gram(X))
        # libsvm's vote: pair (i, j) goes to i when its value is > 0; the first of tied classes wins (argmax).
        votes = self._chunks(X, lambda part: self._votes(self._ovo(part), ties_to_first=False))
        return self.classes_[votes.argmax(axis=1)]


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
    if isinstance(clf, GramSVC):
        return int(clf.svc_.dual_coef_.size + clf.svc_.intercept_.size)
    return int(clf.coef_.size + np.size(clf.intercept_))
