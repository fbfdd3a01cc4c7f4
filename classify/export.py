"""Saved heads as torch modules: a fitted head pipeline (classify/heads.py) re-expressed as tensor operations, and
the features it reads (a backbone's pooled output, or ``stages``: pooled beside the mean of its last stage's input)
computed from images, so that a backbone and its head fold into one TorchScript model that needs neither this
project nor scikit-learn.

Each step keeps scikit-learn's arithmetic: the signed power and the normalisation (``standard``, or ``l2`` rows
scaled by sqrt(D)), PCA, then the classifier — logistic regression as a linear layer and a softmax (a sigmoid for
two classes, as ``predict_proba`` does), the SVM as libsvm's one-vs-one decision values (primal weights for the
linear kernel, the support vectors for RBF) turned into ``decision_function``'s votes plus bounded confidences
and then a softmax (what ``classify.heads.probabilities`` calls a score), kNN as its stored training rows, the
top k and the vote. The output is ``classify.heads.probabilities``' (N, n_classes), classes by label.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm._base import _one_vs_one_coef  # private, as SVC.coef_ builds it
from torch import nn

from classify.heads import GramSVC, scale_by_sqrt_dim, signed_power


class ExportUnsupported(ValueError):
    """A fitted step this module cannot express in torch (named in the message)."""


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


# ---------------------------------------------------------------------------------------------- features


class Embed(nn.Module):
    """Images -> a backbone's features: ``rest(prefix(x))`` (the pooled pre-logits), and with ``stages`` also the
    spatial mean of ``prefix(x)`` (the activations its last stage starts from) beside them."""

    def __init__(self, prefix: nn.Module, rest: nn.Module, *, stages: bool):
        super().__init__()
        self.prefix, self.rest, self.stages = prefix, rest, stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cut = self.prefix(x)
        pooled = self.rest(cut)
        if self.stages:
            return torch.cat([pooled, cut.mean(dim=(2, 3))], dim=1)
        return pooled


def embed_module(backbone, *, stages: bool) -> Embed:
    """The features a head of ``backbone`` (extract.backbones.Backbone) was fitted on, as the shared pass computes
    them: the units in order then the tail (extract.engine.PassRunner); ``stages`` cuts before the last unit."""
    from extract.blocks import block_list

    if not stages:
        return Embed(nn.Identity(), backbone.model, stages=False).eval()
    blocks = block_list(backbone.model)
    units = [m for _, m in blocks.units]
    return Embed(nn.Sequential(*units[:-1]), nn.Sequential(units[-1], blocks.tail), stages=True).eval()


# ---------------------------------------------------------------------------------------------- preprocessing


class SignedPower(nn.Module):
    def __init__(self, power: float):
        super().__init__()
        self.power = float(power)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x) * x.abs().pow(self.power)


class Affine(nn.Module):
    """``(x - shift) @ matrix / scale``: StandardScaler (matrix = I) and PCA (shift = its mean) alike."""

    def __init__(self, shift, scale, matrix=None):
        super().__init__()
        self.register_buffer("shift", _t(shift))
        self.register_buffer("scale", _t(scale))
        self.register_buffer("matrix", _t(matrix) if matrix is not None else torch.empty(0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.shift
        if self.matrix.numel() > 0:
            x = x @ self.matrix
        return x / self.scale


class UnitRows(nn.Module):
    """scikit-learn's l2 Normalizer: rows to unit length (a zero row stays zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.norm(p=2, dim=1, keepdim=True)
        return x / torch.where(norm == 0, torch.ones_like(norm), norm)


class SqrtDimScale(nn.Module):
    """``classify.heads.scale_by_sqrt_dim``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.shape[1]) ** 0.5


def _step(step) -> list[nn.Module]:
    if isinstance(step, FunctionTransformer):
        if step.func is None:
            return []
        if step.func is signed_power:
            return [SignedPower(step.kw_args["power"])]
        if step.func is scale_by_sqrt_dim:
            return [SqrtDimScale()]
    if isinstance(step, StandardScaler):
        n = step.n_features_in_
        mean = step.mean_ if step.with_mean else np.zeros(n)
        scale = step.scale_ if step.with_std else np.ones(n)
        return [Affine(mean, scale)]
    if isinstance(step, Normalizer) and step.norm == "l2":
        return [UnitRows()]
    if isinstance(step, Pipeline):
        return [m for _, s in step.steps for m in _step(s)]
    if isinstance(step, PCA):
        scale = np.sqrt(step.explained_variance_) if step.whiten else np.ones(step.n_components_)
        return [Affine(step.mean_, scale, step.components_.T)]
    raise ExportUnsupported(f"cannot express the fitted step {step!r} in torch")


# ---------------------------------------------------------------------------------------------- classifiers


class LinearSoftmax(nn.Module):
    def __init__(self, coef, intercept):
        super().__init__()
        self.linear = nn.Linear(coef.shape[1], coef.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(_t(coef))
            self.linear.bias.copy_(_t(intercept))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x)
        if z.shape[1] == 1:  # two classes: predict_proba's [1 - sigmoid, sigmoid]
            p = torch.sigmoid(z)
            return torch.cat([1 - p, p], dim=1)
        return torch.softmax(z, dim=1)


class OneVsOne(nn.Module):
    """libsvm's one-vs-one decision values, then ``decision_function``'s scores (votes + confidence / (3 (|c| + 1)));
    ``support`` (the support vectors) and ``gamma`` for the RBF kernel, else ``weights`` are primal."""

    def __init__(self, weights, intercept, *, n_classes: int, support=None, gamma: float = 0.0):
        super().__init__()
        self.register_buffer("weights", _t(weights))
        self.register_buffer("intercept", _t(intercept))
        self.register_buffer("support", _t(support) if support is not None else torch.empty(0, 0))
        self.gamma = float(gamma)
        pairs = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]
        first, second = np.zeros((len(pairs), n_classes)), np.zeros((len(pairs), n_classes))
        for k, (i, j) in enumerate(pairs):
            first[k, i], second[k, j] = 1.0, 1.0
        self.register_buffer("first", _t(first))
        self.register_buffer("second", _t(second))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.support.numel() > 0:
            sq = (x * x).sum(1, keepdim=True) + (self.support * self.support).sum(1)[None, :] - 2 * x @ self.support.T
            x = torch.exp(-self.gamma * sq.clamp(min=0))
        dec = x @ self.weights.T + self.intercept
        if self.first.shape[0] == 1 and self.first.shape[1] == 2:  # binary: scikit-learn's signs, [-d, d]
            return torch.cat([-dec, dec], dim=1)
        wins = (dec >= 0).to(dec.dtype)
        votes = wins @ self.first + (1 - wins) @ self.second
        confidence = dec @ (self.first - self.second)
        return votes + confidence / (3 * (confidence.abs() + 1))


class NearestNeighbours(nn.Module):
    """kNN's predict_proba over stored (preprocessed) training rows: brute distances, the k nearest, their vote
    (uniform, or 1/distance with scikit-learn's rule for exact matches)."""

    def __init__(self, rows, labels, *, n_classes: int, k: int, metric: str, weights: str):
        super().__init__()
        if metric not in ("cosine", "euclidean") or weights not in ("uniform", "distance"):
            raise ExportUnsupported(f"kNN with metric {metric!r} and weights {weights!r}")
        self.register_buffer("rows", _t(rows))
        self.register_buffer("onehot", _t(np.eye(n_classes)[np.asarray(labels)]))
        self.k, self.cosine, self.by_distance = int(k), metric == "cosine", weights == "distance"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            unit = self.rows / self.rows.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
            dist = 1 - (x / x.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)) @ unit.T
        else:
            sq = (x * x).sum(1, keepdim=True) + (self.rows * self.rows).sum(1)[None, :] - 2 * x @ self.rows.T
            dist = sq.clamp(min=0).sqrt()
        near, idx = torch.topk(dist, self.k, dim=1, largest=False)
        w = torch.ones_like(near)
        if self.by_distance:
            exact = near <= 0
            w = torch.where(exact.any(dim=1, keepdim=True), exact.to(near.dtype), 1 / near.clamp(min=1e-30))
        votes = (w[:, :, None] * self.onehot[idx]).sum(1)
        return votes / votes.sum(1, keepdim=True)


class ToClasses(nn.Module):
    """Scores over the classes the head saw in training -> (N, n_classes) by label; unseen classes get ``fill``,
    and ``softmax`` turns scores into what ``classify.heads.probabilities`` returns."""

    def __init__(self, classes, *, n_classes: int, fill: float, softmax: bool):
        super().__init__()
        self.register_buffer("classes", torch.as_tensor(np.asarray(classes, dtype=np.int64)))
        self.n_classes, self.fill, self.softmax = int(n_classes), float(fill), softmax

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        out = torch.full((s.shape[0], self.n_classes), self.fill, dtype=s.dtype, device=s.device)
        out = out.index_copy(1, self.classes, s)
        return torch.softmax(out, dim=1) if self.softmax else out


def _classifier(clf) -> tuple[nn.Module, bool]:
    """(module giving scores over ``clf.classes_``, whether they are probabilities)."""
    if isinstance(clf, LogisticRegression):
        return LinearSoftmax(clf.coef_, clf.intercept_), True
    if isinstance(clf, KNeighborsClassifier):
        return NearestNeighbours(clf._fit_X, clf._y, n_classes=len(clf.classes_), k=clf.n_neighbors,
                                 metric=clf.metric, weights=clf.weights), True
    if isinstance(clf, GramSVC):
        svc, n = clf.svc_, len(clf.classes_)
        if clf.kernel == "linear":
            coef = np.vstack(_one_vs_one_coef(svc.dual_coef_, svc.n_support_, clf.support_vectors_))
            return OneVsOne(coef, svc.intercept_, n_classes=n), False
        # Per pair, its coefficients over the support vectors (the same construction with an identity "basis").
        alphas = np.vstack(_one_vs_one_coef(svc.dual_coef_, svc.n_support_, np.eye(len(clf.support_vectors_))))
        return OneVsOne(alphas, svc.intercept_, n_classes=n, support=clf.support_vectors_, gamma=clf.gamma_), False
    raise ExportUnsupported(f"cannot express a {type(clf).__name__} head in torch")


def head_module(model, *, n_classes: int) -> nn.Sequential:
    """Features (N, D) -> class probabilities (N, ``n_classes``), the fitted ``model`` (a head pipeline)'s own."""
    steps = model.steps if isinstance(model, Pipeline) else [("clf", model)]
    prep = [m for _, step in steps[:-1] for m in _step(step)]
    clf = steps[-1][1]
    scores, calibrated = _classifier(clf)
    to_classes = ToClasses(clf.classes_, n_classes=n_classes, fill=0.0 if calibrated else float("-inf"),
                           softmax=not calibrated)
    return nn.Sequential(*prep, scores, to_classes).eval()
