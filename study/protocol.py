"""The study's protocol rules in one place: how a choice is made on val, how two models are compared, and how
few-shot images are drawn.

Within one family (a head's grid points) ``rank_key`` ranks candidates: the best val mean per-class accuracy, then
the lower val log-loss, then the earlier one. Across families no log-loss breaks a tie: a tuner study's trials
(``choose_trial``) and the report's decision (``decide``) take the best val score, and ``decide`` takes a cheaper
candidate whenever its val difference from the val-best is within val noise (a paired bootstrap over val images,
stratified by class: ``class_stratified``). Few-shot draws (``draw_indices``) are seeded and shared by both arms,
so a draw seed gives them the same images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
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


def best_then_cheapest(vals: Sequence[float | None], costs: Sequence[float], order: Sequence | None = None) -> int:
    """The index of the best val score; an exact tie goes to the lower cost, then the earlier ``order``."""
    order = range(len(vals)) if order is None else order
    return min(range(len(vals)), key=lambda i: (-_known(vals[i], otherwise=-math.inf), costs[i], order[i]))


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


# ---------------------------------------------------------------- paired statistics on mean per-class accuracy

LEVEL = 0.95  # every interval the study states


@dataclass(frozen=True)
class Part:
    """One scored set: image ids, their labels and one value per image (a model's correctness, 0 or 1, or the
    difference of two models' correctness on the same images)."""
    ids: Sequence[str]
    labels: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class Boot:
    """A statistic's observed value and its bootstrap draws."""
    observed: float
    draws: np.ndarray

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        """The percentile interval."""
        lo, hi = np.quantile(self.draws, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)

    @property
    def p_value(self) -> float:
        """Two-sided bootstrap p-value of 0 (the percentile interval inverted): twice the smaller share of draws
        on either side of 0, with one added to each count, so it is never 0."""
        n = len(self.draws)
        side = min(int(np.sum(self.draws <= 0)), int(np.sum(self.draws >= 0)))
        return min(1.0, 2 * (side + 1) / (n + 1))


def class_stratified(parts: Sequence[Part], *, n_boot: int, seed: int, resample_parts: bool = False) -> Boot:
    """The mean over ``parts`` of the mean per-class value (per class, the mean of its images' values), and
    ``n_boot`` bootstrap draws of it with a seeded generator.

    Images are resampled within their class, each class keeping its number of images (so every class is in every
    resample); an image carries the parts that hold it, so an image several parts hold (split seeds share most
    images) keeps one weight in all of them. A class of a part is scored over the resampled images that part
    holds; a part that drew no image of a class is scored over its other classes in that resample, and a part
    that drew no image at all sits that resample out. (Strata of class x the set of parts holding the image would
    keep each part's class sizes, but with split seeds whose val sets overlap partly they shrink to one or two
    images, whose resamples never vary: an interval of zero width.) With ``resample_parts`` the parts themselves
    are resampled too (few-shot draws: what other draws of training images would have given)."""
    labels, member, values = _union(parts)
    order = np.argsort(labels, kind="stable")
    values, member, labels = values[order], member[order], labels[order]
    class_start = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    size = np.diff(np.r_[class_start, len(labels)])
    start, span = np.repeat(class_start, size), np.repeat(size, size)  # each position: its class's first image, size

    def mean_per_class(class_sums: np.ndarray, counts: np.ndarray) -> np.ndarray:  # (..., classes, parts) -> parts
        present = counts > 0
        return (class_sums / np.where(present, counts, 1) * present).sum(axis=-2) / np.maximum(present.sum(axis=-2), 1)

    rng = np.random.default_rng(seed)
    draws, drawn = [], []
    for n in np.diff(np.r_[np.arange(0, n_boot, BOOT_CHUNK), n_boot]):
        pick = start + (rng.random((n, len(start))) * span).astype(np.int64)
        counts = np.add.reduceat(member[pick], class_start, axis=1)
        draws.append(mean_per_class(np.add.reduceat(values[pick], class_start, axis=1), counts))
        drawn.append(counts.sum(axis=-2) > 0)
    per_part = np.concatenate(draws)  # (n_boot, parts)
    weights = (rng.multinomial(len(parts), np.full(len(parts), 1 / len(parts)), size=n_boot) if resample_parts
               else np.ones((n_boot, len(parts))))
    drawn = np.concatenate(drawn)
    weights = np.where((weights * drawn).sum(axis=1, keepdims=True) > 0, weights * drawn, drawn)
    observed = mean_per_class(np.add.reduceat(values, class_start, axis=0),
                              np.add.reduceat(member, class_start, axis=0)).mean()
    return Boot(observed=float(observed), draws=(per_part * weights).sum(axis=1) / weights.sum(axis=1))


BOOT_CHUNK = 50  # resamples drawn at once: bounded memory (50 x images x parts values)


def _union(parts: Sequence[Part]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parts' images once each: labels, which parts hold each (0/1) and its value in each (0 where absent)."""
    if not parts:
        raise ValueError("class_stratified: nothing to resample")
    pos: dict[str, int] = {}
    for p in parts:
        for i in p.ids:
            pos.setdefault(i, len(pos))
    labels = np.full(len(pos), -1, dtype=np.int64)
    member = np.zeros((len(pos), len(parts)))
    values = np.zeros((len(pos), len(parts)))
    for s, p in enumerate(parts):
        idx = np.array([pos[i] for i in p.ids], dtype=np.int64)
        known = labels[idx] >= 0
        if np.any(labels[idx][known] != np.asarray(p.labels)[known]):
            raise ValueError("class_stratified: an image has two labels in two parts")
        labels[idx], member[idx, s], values[idx, s] = p.labels, 1, p.values
    return labels, member, values


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (the family-wise error rate), in their order."""
    p = np.asarray(p_values, dtype=float)
    adjusted, running = np.empty(len(p)), 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def correct(ids: Sequence[str], preds: Sequence[int], labels_by_id: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, correctness 0/1) of predictions ``preds`` of images ``ids``; an id the labels lack is an error
    (the rows and the manifest come from different datasets)."""
    missing = [i for i in ids if i not in labels_by_id]
    if missing:
        raise ValueError(f"image {missing[0]!r} is not in the manifest: the results and the manifest come from "
                         "different datasets")
    labels = np.array([labels_by_id[i] for i in ids], dtype=np.int64)
    return labels, (labels == np.asarray(preds, dtype=np.int64)).astype(float)


def paired_parts(a: dict, b: dict, labels_by_id: dict[str, int]) -> list[Part]:
    """Per key both hold (a split seed, or a (split seed, draw)): ``a`` minus ``b`` correctness on the images both
    predicted. ``a`` and ``b`` map the key to (ids, predictions)."""
    parts = []
    for key in sorted(set(a) & set(b)):
        pred_b = dict(zip(*b[key]))
        ids = [i for i in a[key][0] if i in pred_b]
        if not ids:
            raise ValueError(f"paired comparison at {key}: the two models share no image")
        pred_a = dict(zip(*a[key]))
        labels, ca = correct(ids, [pred_a[i] for i in ids], labels_by_id)
        _, cb = correct(ids, [pred_b[i] for i in ids], labels_by_id)
        parts.append(Part(ids=ids, labels=labels, values=ca - cb))
    return parts


# -------------------------------------------------------------------------------- the decision rule, on val


@dataclass(frozen=True)
class Candidate:
    """What ``decide`` reads of one candidate: per split seed its val ids and predictions, its val score (mean
    over split seeds of the rows' val mean per-class accuracy), its training cost in seconds (features included,
    mean over split seeds) and its inference seconds per image."""
    name: str
    val: dict = field(default_factory=dict)  # split seed -> (val ids, val predictions)
    val_score: float | None = None
    cost_s: float = math.inf
    infer_s: float | None = None


@dataclass(frozen=True)
class Decision:
    """What ``decide`` chose and why. ``noise[i]``: the val-best minus candidate i on val, (difference, lo, hi),
    for every candidate with val predictions; ``within`` the candidates that difference does not separate from
    the val-best (the val-best and exact ties included)."""
    chosen: int
    val_best: int
    within: tuple[int, ...]
    ties: tuple[int, ...]            # the candidates with exactly the chosen one's val score, itself excluded
    saturated: bool                  # the best val score is 100%: val cannot rank the candidates at the top
    measured: bool                   # every candidate had val predictions (otherwise only exact ties count)
    noise: dict = field(default_factory=dict)
    runner_up: int | None = None
    n_seeds: int = 1


RULE = ("the candidate with the best val mean per-class accuracy (mean over split seeds), unless a cheaper one is "
        "within val noise of it — the 95% interval of their paired val difference (a bootstrap over val images, "
        "stratified by class; over split seeds the mean difference, an image shared by seeds resampled once) "
        "includes 0 — then the cheapest such candidate (training seconds including features, then inference "
        "seconds per image). An exact val tie is a tie, settled by the same cost order; no log-loss is compared "
        "across families")


def decide(candidates: Sequence[Candidate], *, labels_by_id: dict[str, int], n_boot: int = 2000,
           seed: int = 0) -> Decision:
    """The candidate to use, by ``RULE``; the runner-up is the val-best when a cheaper candidate was taken,
    otherwise the rule applied to the others."""
    if not candidates:
        raise ValueError("decide: no candidates")
    chosen, best, within, noise = _pick(candidates, range(len(candidates)), labels_by_id, n_boot=n_boot, seed=seed)
    rest = [i for i in range(len(candidates)) if i != chosen]
    runner = best if best != chosen else (
        _pick(candidates, rest, labels_by_id, n_boot=n_boot, seed=seed)[0] if rest else None)
    score = candidates[chosen].val_score
    return Decision(chosen=chosen, val_best=best, within=within, noise=noise, runner_up=runner,
                    ties=tuple(i for i in rest if candidates[i].val_score == score and score is not None),
                    saturated=_known(candidates[best].val_score, otherwise=0.0) >= 1.0 - 1e-12,
                    measured=all(c.val for c in candidates),
                    n_seeds=max(len(c.val) for c in candidates) or 1)


def _pick(candidates: Sequence[Candidate], among, labels_by_id: dict[str, int], *, n_boot: int,
          seed: int) -> tuple[int, int, tuple[int, ...], dict]:
    """(chosen, val-best, within noise, noise intervals) among the indices ``among``."""
    among = list(among)
    cost = [(candidates[i].cost_s, _known(candidates[i].infer_s, otherwise=math.inf)) for i in among]
    best = among[best_then_cheapest([candidates[i].val_score for i in among], cost)]
    noise = {}
    for i in among:
        if i != best and candidates[i].val and candidates[best].val:
            boot = class_stratified(paired_parts(candidates[best].val, candidates[i].val, labels_by_id),
                                    n_boot=n_boot, seed=seed)
            noise[i] = (boot.observed, *boot.interval())
    top = candidates[best].val_score
    within = tuple(i for i in among if i == best or (top is not None and candidates[i].val_score == top)
                   or (i in noise and noise[i][1] <= 0))
    chosen = min(within, key=lambda i: (candidates[i].cost_s, _known(candidates[i].infer_s, otherwise=math.inf), i))
    return chosen, best, within, noise
