"""Ensembles of fine-tunes: the fine-tune arm's counterpart of a fused feature set (classify/fusion.py).

A fused head reads several backbones' features at once; its fair opponent is not one fine-tuned network
but the same backbones fine-tuned, each with its own val-chosen policy, their softmax outputs averaged
(late fusion: the networks are trained apart, so nothing is chosen jointly and nothing trains again).
The ensemble is named like the fused set (``fused:a+b``), so the report pairs the two in one verdict.

Its val score is the average of the members' val outputs from the models whose val scores chose them
(trained on train); its test score the average of their refits' test outputs (trained on train+val) —
the same two models each member's own row reports. Its cost is the sum of its members' costs.
"""
from __future__ import annotations

import numpy as np
from scipy.special import softmax
from sklearn.metrics import log_loss

from study.hashing import spec_hash
from study.metrics import evaluate, mean_per_class_accuracy
from study.provenance import git_sha
from study.results import ENSEMBLE, Costs, Metrics, Point, ResultRow, Selection, fused_name

METHOD = ENSEMBLE
# What the report says of an ensemble's training data it reads off its members: they must agree on it.
_SHARED = ("split_seed", "manifest_hash", "class_names", "test_sample_id", "feature_set", "tta", "fit_on", "views",
           "views_fresh")


def _check_members(rows: list[ResultRow], preds: list[dict]) -> None:
    if len(rows) < 2:
        raise ValueError(f"an ensemble needs at least two fine-tunes, got {len(rows)}")
    backbones = [r.backbone for r in rows]
    if len(set(backbones)) != len(backbones):
        raise ValueError(f"an ensemble's members are distinct backbones, got {backbones}")
    first, p0 = rows[0], preds[0]
    for r, p in zip(rows[1:], preds[1:]):
        for key in _SHARED:
            if getattr(r, key) != getattr(first, key):
                raise ValueError(f"cannot ensemble {r.backbone} with {first.backbone}: their {key!r} differ")
        for split in ("val", "test"):
            if p[f"{split}_sample_id"] != p0[f"{split}_sample_id"]:
                raise ValueError(f"cannot ensemble {r.backbone} with {first.backbone}: their {split} rows "
                                 "are not the same images in the same order")
    for r, p in zip(rows, preds):
        if tuple(p["test_sample_id"]) != r.test_sample_id:
            raise ValueError(f"the predictions of {r.backbone} {r.method} are not its row's test images")


def _total(rows: list[ResultRow], value) -> float | None:
    values = [value(r) for r in rows]
    return None if any(v is None for v in values) else sum(values)


def _costs(rows: list[ResultRow]) -> Costs:
    return Costs(train_s=_total(rows, lambda r: r.costs.train_s), predict_s=_total(rows, lambda r: r.costs.predict_s),
                 train_epochs_s=_total(rows, lambda r: r.costs.train_epochs_s),
                 prefix_cache_s=_total(rows, lambda r: r.costs.prefix_cache_s))


def ensemble_row(members: list[tuple[ResultRow, dict]], *, n_boot: int) -> ResultRow:
    """The results row of the ensemble of ``members``: (fine-tune row, its predictions from
    finetune.experiment.run_predictions) pairs, one per backbone, all of one split seed and manifest."""
    rows, preds = [m[0] for m in members], [m[1] for m in members]
    _check_members(rows, preds)
    first, p0 = rows[0], preds[0]
    y_val, y_test = np.asarray(p0["val_labels"]), np.asarray(p0["test_labels"])
    val = np.mean([softmax(np.asarray(p["val_logits"], np.float64), axis=1) for p in preds], axis=0)
    test = np.mean([softmax(np.asarray(p["test_logits"], np.float64), axis=1) for p in preds], axis=0)
    val_score = mean_per_class_accuracy(y_val, val.argmax(1))
    val_loss = float(log_loss(y_val, val, labels=np.arange(val.shape[1])))
    described = " + ".join(f"{r.backbone} {r.method}" for r in rows)
    pred = test.argmax(1)
    metrics = evaluate(y_test, pred, test, n_classes=len(first.class_names), n_boot=n_boot, seed=first.split_seed)
    return ResultRow(
        kind="finetune", backbone=fused_name([r.backbone for r in rows]), method=METHOD,
        feature_set=first.feature_set, tta=first.tta, split_seed=first.split_seed, metrics=Metrics.from_dict(metrics),
        test_sample_id=first.test_sample_id, test_pred=tuple(pred.tolist()),
        hyperparams={"combine": "mean softmax",
                     "members": [{"backbone": r.backbone, "method": r.method, "run_key": r.keys.get("run_key"),
                                  "val_mean_per_class": r.val_mean_per_class, "epochs_run": r.epochs_run}
                                 for r in rows]},
        # Nothing is swept: the one "setting" is the members, each chosen on val among its backbone's policies.
        selection=Selection(points=(Point(params={"members": described}, val_mean_per_class=val_score,
                                          val_log_loss=val_loss),), chosen=0),
        val_mean_per_class=val_score, fit_on=first.fit_on, views=first.views, views_fresh=first.views_fresh,
        costs=_costs(rows), trainable_params=_total(rows, lambda r: r.trainable_params),
        total_params=_total(rows, lambda r: r.total_params),
        cache_key=spec_hash({"ensemble": [r.cache_key for r in rows]}),
        keys={"run_key": spec_hash({"ensemble": [r.keys.get("run_key") for r in rows]})},
        manifest_hash=first.manifest_hash, n_train=first.n_train, n_val=first.n_val, n_fit=first.n_fit,
        n_test=first.n_test, class_names=first.class_names, git_sha=git_sha(),
        val_sample_id=tuple(p0["val_sample_id"]), val_pred=tuple(int(p) for p in val.argmax(1)))
