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

from classify.fusion import fused_name
from study.hashing import spec_hash
from study.metrics import evaluate, mean_per_class_accuracy
from study.provenance import git_sha

METHOD = "ft:ensemble"


def ensemble_row(members: list[tuple[dict, dict]], *, n_boot: int) -> dict:
    """The results row of the ensemble of ``members``: (fine-tune row, its predictions from
    finetune.experiment.run_predictions) pairs, one per backbone, all of one split seed and manifest."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two fine-tunes, got {len(members)}")
    rows, preds = [m[0] for m in members], [m[1] for m in members]
    first, p0 = rows[0], preds[0]
    backbones = [r["backbone"] for r in rows]
    if len(set(backbones)) != len(backbones):
        raise ValueError(f"an ensemble's members are distinct backbones, got {backbones}")
    for r, p in zip(rows[1:], preds[1:]):
        # What the report says of the ensemble's training data it reads off the members: they must agree.
        for key in ("seed", "manifest_hash", "class_names", "test_sample_id", "feature_set", "tta", "fit_on", "views",
                    "views_fresh"):
            if r[key] != first[key]:
                raise ValueError(f"cannot ensemble {r['backbone']} with {first['backbone']}: their {key!r} differ")
        for split in ("val", "test"):
            if p[f"{split}_sample_id"] != p0[f"{split}_sample_id"]:
                raise ValueError(f"cannot ensemble {r['backbone']} with {first['backbone']}: their {split} rows "
                                 "are not the same images in the same order")
    for r, p in zip(rows, preds):
        if p["test_sample_id"] != r["test_sample_id"]:
            raise ValueError(f"the predictions of {r['backbone']} {r['method']} are not its row's test images")
    y_val, y_test = np.asarray(p0["val_labels"]), np.asarray(p0["test_labels"])
    val = np.mean([softmax(np.asarray(p["val_logits"], np.float64), axis=1) for p in preds], axis=0)
    test = np.mean([softmax(np.asarray(p["test_logits"], np.float64), axis=1) for p in preds], axis=0)
    val_score = mean_per_class_accuracy(y_val, val.argmax(1))
    val_loss = float(log_loss(y_val, val, labels=np.arange(val.shape[1])))
    described = " + ".join(f"{r['backbone']} {r['method']}" for r in rows)
    pred = test.argmax(1)

    def total(key):
        values = [r.get(key) for r in rows]
        return None if any(v is None for v in values) else sum(values)

    return {
        "kind": "finetune",
        "backbone": fused_name(backbones),
        "method": METHOD,
        "feature_set": first["feature_set"],
        "tta": first["tta"],
        "seed": first["seed"],
        "k_per_class": None,
        "metrics": evaluate(y_test, pred, test, n_classes=len(first["class_names"]), n_boot=n_boot,
                            seed=first["seed"]),
        "test_sample_id": first["test_sample_id"],
        "test_pred": pred.tolist(),
        "hyperparams": {"combine": "mean softmax",
                        "members": [{"backbone": r["backbone"], "method": r["method"], "run_key": r["run_key"],
                                     "val_mean_per_class": r["val_mean_per_class"], "epochs_run": r.get("epochs_run")}
                                    for r in rows]},
        # Nothing is swept: the one "setting" is the members, each chosen on val among its backbone's policies.
        "selection": {"metric": "val_mean_per_class", "best_epoch": None, "best_score": val_score,
                      "best_log_loss": val_loss, "curve": [], "stopped_early": None,
                      "grid": [{"params": {"members": described}, "val_mean_per_class": val_score,
                                "val_log_loss": val_loss}]},
        "val_mean_per_class": val_score,
        "fit_on": first["fit_on"],
        "views": first["views"],
        "views_fresh": first["views_fresh"],
        "train_s": total("train_s"),
        "train_epochs_s": total("train_epochs_s"),
        "prefix_cache_s": total("prefix_cache_s"),
        "predict_s": total("predict_s"),
        "trainable_params": total("trainable_params"),
        "total_params": total("total_params"),
        "epochs_run": None,  # per member: hyperparams.members
        "cache_key": spec_hash({"ensemble": [r["cache_key"] for r in rows]}),
        "run_key": spec_hash({"ensemble": [r["run_key"] for r in rows]}),
        "manifest_hash": first["manifest_hash"],
        "n_train": first["n_train"],
        "n_val": first["n_val"],
        "n_fit": first.get("n_fit"),
        "n_test": first["n_test"],
        "class_names": first["class_names"],
        "git_sha": git_sha(),
    }
