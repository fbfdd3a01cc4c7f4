"""The study's protocol rules in one place: how a choice is made on val, and how few-shot images are drawn.

Every choice the study makes — a head's grid point, a fine-tune's recipe, each arm's variant, the report's
headline — ranks candidates with ``rank_key``: the best val mean per-class accuracy first, then the lower
val log-loss (an unknown or NaN log-loss counts as the worst), then the earlier candidate. Few-shot draws
(``draw_indices``) are seeded and shared by both arms, so a draw seed gives them the same images.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from study.schema import Field, int_range, list_of, one_of


def _known(x: float | None, *, otherwise: float) -> float:
    return otherwise if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def rank_key(val: float | None, log_loss: float | None, order: int) -> tuple[float, float, int]:
    """Sort key of a candidate, best first: higher val score, lower val log-loss, earlier ``order``."""
    return -_known(val, otherwise=-math.inf), _known(log_loss, otherwise=math.inf), order


def choose(scores: Sequence[tuple[float | None, float | None]]) -> int:
    """The index of the chosen candidate among (val score, val log-loss) pairs, by ``rank_key``."""
    if not scores:
        raise ValueError("choose: no candidates")
    return min(range(len(scores)), key=lambda i: rank_key(scores[i][0], scores[i][1], i))


def choose_trial(trials: Sequence) -> int:
    """The index of the chosen trial among a tuner study's completed ``trials`` (each with ``val`` and ``number``):
    the best val score; an exact tie goes to the earlier trial. Not to the cheaper one: wall seconds differ from run
    to run, and a choice must be the same whenever the same trials are scored. A val log-loss breaks no tie either:
    a study's trials differ in method or label smoothing, so their losses share no scale."""
    if not trials:
        raise ValueError("choose_trial: no completed trial")
    return min(range(len(trials)), key=lambda i: (-_known(trials[i].val, otherwise=-math.inf), trials[i].number))


def val_order(df, *, val: str, loss: str, order: str = "row"):
    """``df`` (pandas) sorted best first by ``rank_key`` over its columns ``val``, ``loss`` and ``order``."""
    key = df.assign(_val=df[val].astype(float).fillna(-math.inf), _loss=df[loss].astype(float).fillna(math.inf))
    return key.sort_values(["_val", "_loss", order], ascending=[False, True, True]).drop(columns=["_val", "_loss"])


# The few-shot curve: both arms, per backbone, on the same k images per class drawn from train (seeds seed,
# seed+1, ...), each (arm, backbone, k, draw) choosing its settings on val with a small tuner budget of its own.
FEWSHOT_SCHEMA = {
    "k": Field([1, 5, 10], list_of(int_range(1), min_len=0), "images per class; [] turns the few-shot curve off"),
    "draws": Field(3, int_range(1, 100), "draws per k, the same images for both arms (seed, seed+1, ...)"),
    "trials": Field(4, int_range(1, 10_000), "tuner trials per (arm, backbone, k, draw), the same for both arms"),
    # A curve retrains both arms per k and draw; on a CPU drawing them on the first split seed only is most of
    # a study's saving.
    "split_seeds": Field("all", one_of("all", "first"), "the split seeds that draw few-shot curves"),
}


def curve_on_seed(config: dict) -> bool:
    """Whether this split seed (``config["seed"]``) draws the few-shot curves: every seed, or only the first
    of ``seeds`` with ``fewshot.split_seeds = "first"``."""
    seeds = list(config.get("seeds") or [config["seed"]])
    few = config["fewshot"]
    return bool(few["k"]) and (few["split_seeds"] == "all" or config["seed"] == seeds[0])


def draw_seeds(config: dict) -> range:
    """The few-shot draw seeds of this split seed: seed, seed+1, ... (both arms draw with them)."""
    return range(config["seed"], config["seed"] + config["fewshot"]["draws"])


def fewshot_backbones(config: dict, available: list[str]) -> list[str]:
    """The single backbones whose curve both arms draw: those fine-tuned (``finetune.backbones``, [] = all) when
    the fine-tune stage runs, else every available one."""
    tuned = config["finetune"]["backbones"] or available
    return [b for b in available if "finetune" not in config["stages"] or b in tuned]


def draw_indices(labels: np.ndarray, *, k: int, seed: int) -> np.ndarray:
    """Positions of ``k`` items of every class in ``labels``, drawn without replacement with a seeded generator.
    Both arms draw through this on the same candidates in the same (manifest) order, so a draw seed gives
    the head and the fine-tune the same images."""
    rng = np.random.default_rng(seed)
    picks = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < k:
            raise ValueError(f"few-shot k={k}: class {label} has only {len(members)} images in the pool")
        picks.append(np.sort(rng.choice(members, size=k, replace=False)))
    return np.concatenate(picks)


def smallest_class(labels: np.ndarray) -> int:
    """Images in the smallest class present in ``labels`` (one label per image): the largest k a draw can take."""
    return int(np.bincount(labels)[np.unique(labels)].min())
