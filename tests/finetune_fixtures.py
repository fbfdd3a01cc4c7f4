"""Shared helpers for the fine-tune tests: a small tuner config and one call that searches a backbone's fine-tunes."""
from __future__ import annotations

from study import tune
from study.schema import validate

# One fixed recipe unless a test asks for more: every axis of the fine-tune space a single choice (the tuner then
# draws it every trial), one trial, no pruning, random draws seeded per trial (the same in any process).
FIXED = {"lr": [3e-3], "backbone_lr_mult": [0.1], "weight_decay": [0.01], "label_smoothing": [0.1], "epochs": [3]}


def tune_config(*, finetune: dict | None = None, **changes):
    raw = {"trials": 1, "sampler": "random", "startup_trials": 1, "pruner": "none", "seed": 0,
           "finetune": {**FIXED, **(finetune or {})}, **changes}
    return validate(raw, tune.SCHEMA, prefix="tune")


def search(*, backbone, policies, hp: dict, tune_cfg=None, tune_dir=None, finetune_dir, **kw):
    """finetune.search.run_finetune over ``policies`` (a list, or one policy), its journal beside ``finetune_dir``."""
    from finetune.search import run_finetune

    policies = [policies] if isinstance(policies, str) else list(policies)
    return run_finetune(backbone=backbone, hp={**hp, "policies": policies}, tune_cfg=tune_cfg or tune_config(),
                        tune_dir=tune_dir or finetune_dir.parent / "tune", finetune_dir=finetune_dir, **kw)


def recipe(**changes) -> dict:
    """A whole recipe for a Trainer built by hand: the default [finetune] section and the FIXED setting."""
    from pipeline.config import load_config

    return {**load_config()["finetune"], **{k: v[0] for k, v in FIXED.items()}, **changes}
