"""The report's decision and its paired statistics: which (backbone, arm) to use, chosen on val by the protocol's
rule (``study.protocol.decide``), and the comparisons on test mean per-class accuracy the report declares before
reading test — per backbone the head against the fine-tune, and the choice against its runner-up — each with a
class-stratified bootstrap interval and p-value, Holm-adjusted as one family.

The unit is a (backbone, arm): one tuner search per split seed chooses its method, so a unit holds one row per
split seed (the seed's val-chosen row of that backbone and arm). Over split seeds every figure is the mean over
the seeds, and its interval resamples test images once for all seeds (the seeds' test sets share most images).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from study.protocol import Boot, Candidate, Decision, Part, class_stratified, correct, decide, holm, paired_parts
from study.results import ResultRow

ARM_ORDER = {"head": 0, "finetune": 1}


@dataclass(frozen=True)
class Unit:
    """A (backbone, arm) and its val-chosen row at each split seed."""
    backbone: str
    arm: str
    rows: dict  # split seed -> ResultRow

    @property
    def key(self) -> tuple[str, str]:
        return self.backbone, self.arm

    @property
    def seeds(self) -> list[int]:
        return sorted(self.rows)

    @property
    def first(self) -> ResultRow:
        return self.rows[self.seeds[0]]

    @property
    def val_score(self) -> float | None:
        vals = [r.val_mean_per_class for r in self.rows.values()]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    @property
    def cost_s(self) -> float:
        """Training wall seconds including the features or activations it read, mean over split seeds."""
        return float(np.mean([r.costs.total_s for r in self.rows.values()]))

    @property
    def infer_s(self) -> float:
        """Inference wall seconds per test image, mean over split seeds."""
        return float(np.mean([r.predict_s / max(r.n_test, 1) for r in self.rows.values()]))

    def methods(self, *, code: bool = False) -> str:
        """Each split seed's chosen method, e.g. ``svm (clean) on seeds 0, 1; knn (clean) on seed 2`` (``code``: each
        method in markdown code)."""
        by: dict[str, list[int]] = {}
        for seed in self.seeds:
            r = self.rows[seed]
            name = f"{r.method} ({r.feature_set})"
            by.setdefault(f"`{name}`" if code else name, []).append(seed)
        if len(by) == 1:
            return next(iter(by))
        return "; ".join(f"{m} on seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}" for m, s in by.items())

    def test(self) -> dict:
        return {s: (r.test_sample_id, r.test_pred) for s, r in self.rows.items()}

    def candidate(self) -> Candidate:
        val = {s: (r.val_sample_id, r.val_pred) for s, r in self.rows.items() if r.val_sample_id}
        return Candidate(name=f"{self.backbone} {self.arm}", val=val if len(val) == len(self.rows) else {},
                         val_score=self.val_score, cost_s=self.cost_s, infer_s=self.infer_s)


def units_of(chosen: pd.DataFrame, rows: list[ResultRow]) -> list[Unit]:
    """The units of ``chosen`` (``collect.chosen_per_seed``), heads before fine-tunes per backbone."""
    out = [Unit(backbone=b, arm=a, rows={int(s): rows[int(i)] for s, i in zip(part.split_seed, part.row)})
           for (b, a), part in chosen.groupby(["backbone", "arm"], sort=False)]
    return sorted(out, key=lambda u: (u.backbone, ARM_ORDER.get(u.arm, 9)))


@dataclass(frozen=True)
class Estimate:
    """A test figure (a unit's mean per-class accuracy, or a paired difference of two) over its split seeds: the
    mean over seeds with its class-stratified bootstrap interval and p-value (of 0), each seed's value with its
    own interval, and the split-resampling spread (sd over seeds; the seeds share most images, so it is no
    replicate sd)."""
    value: float
    lo: float
    hi: float
    p: float
    per_seed: tuple  # (seed, value, lo, hi)

    @property
    def spread(self) -> float | None:
        values = [v for _, v, _, _ in self.per_seed]
        return float(np.std(values, ddof=1)) if len(values) > 1 else None

    @classmethod
    def of(cls, parts: dict[int, Part], *, n_boot: int, seed: int, per_seed: bool = True) -> Estimate:
        """Over the split seeds of ``parts``; ``per_seed=False`` leaves each seed's own interval out (NaN)."""
        seeds = sorted(parts)
        over: Boot = class_stratified([parts[s] for s in seeds], n_boot=n_boot, seed=seed)
        per = []
        for s in seeds:
            if len(seeds) == 1 or per_seed:
                one = over if len(seeds) == 1 else class_stratified([parts[s]], n_boot=n_boot, seed=seed)
                per.append((s, one.observed, *one.interval()))
            else:
                labels, values = np.asarray(parts[s].labels), np.asarray(parts[s].values)
                mean = float(np.mean([values[labels == c].mean() for c in np.unique(labels)]))
                per.append((s, mean, np.nan, np.nan))
        return cls(value=over.observed, lo=over.interval()[0], hi=over.interval()[1], p=over.p_value,
                   per_seed=tuple(per))


def accuracy(unit: Unit, labels_by_id: dict[str, int], *, n_boot: int, seed: int = 0) -> Estimate:
    """A unit's test mean per-class accuracy over its split seeds (each seed's own interval: its row's)."""
    parts = {}
    for s, (ids, preds) in unit.test().items():
        labels, ok = correct(ids, preds, labels_by_id)
        parts[s] = Part(ids=ids, labels=labels, values=ok)
    return Estimate.of(parts, n_boot=n_boot, seed=seed, per_seed=False)


def row_interval(row: ResultRow, labels_by_id: dict[str, int], *, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """One row's class-stratified interval of its test mean per-class accuracy."""
    labels, ok = correct(row.test_sample_id, row.test_pred, labels_by_id)
    return class_stratified([Part(ids=row.test_sample_id, labels=labels, values=ok)], n_boot=n_boot,
                            seed=seed).interval()


@dataclass(frozen=True)
class Comparison:
    """A declared paired comparison on test: ``a`` minus ``b``, mean per-class accuracy, on the split seeds both
    hold; ``p_holm`` is its p-value adjusted with the family's others."""
    what: str
    a: Unit
    b: Unit
    diff: Estimate
    p_holm: float | None = None


def compare(a: Unit, b: Unit, labels_by_id: dict[str, int], *, what: str, n_boot: int, seed: int = 0) -> Comparison:
    parts = paired_parts(a.test(), b.test(), labels_by_id)
    seeds = sorted(set(a.rows) & set(b.rows))
    return Comparison(what=what, a=a, b=b, diff=Estimate.of(dict(zip(seeds, parts)), n_boot=n_boot, seed=seed))


@dataclass(frozen=True)
class Card:
    """The decision card: the candidates (units on every split seed), the protocol's decision over them, the
    choice's test accuracy and its comparison with the runner-up; ``left_out``: units missing a split seed."""
    candidates: list[Unit]
    decision: Decision
    accuracy: Estimate
    headline: Comparison | None
    left_out: list[Unit]

    @property
    def chosen(self) -> Unit:
        return self.candidates[self.decision.chosen]

    @property
    def runner_up(self) -> Unit | None:
        i = self.decision.runner_up
        return None if i is None else self.candidates[i]

    @property
    def val_best(self) -> Unit:
        return self.candidates[self.decision.val_best]


def make_card(units: list[Unit], labels_by_id: dict[str, int], *, n_boot: int, seed: int = 0) -> Card | None:
    """The decision over the units present on every split seed any unit has (others cannot be compared over the
    same seeds), with the chosen unit's test accuracy and the headline comparison (chosen minus runner-up)."""
    if not units:
        return None
    seeds = set().union(*(u.rows for u in units))
    candidates = [u for u in units if set(u.rows) == seeds]
    if not candidates:
        return None
    decision = decide([u.candidate() for u in candidates], labels_by_id=labels_by_id, n_boot=n_boot, seed=seed)
    chosen = candidates[decision.chosen]
    runner = None if decision.runner_up is None else candidates[decision.runner_up]
    headline = None if runner is None else compare(chosen, runner, labels_by_id, what="the choice minus the runner-up",
                                                   n_boot=n_boot, seed=seed)
    return Card(candidates=candidates, decision=decision, accuracy=accuracy(chosen, labels_by_id, n_boot=n_boot,
                                                                            seed=seed),
                headline=headline, left_out=[u for u in units if set(u.rows) != seeds])


def arm_choices(units: list[Unit], labels_by_id: dict[str, int], *, n_boot: int, seed: int = 0) -> dict[str, Unit]:
    """Each arm's unit by the same rule, over that arm's units on every split seed (the figures ring them)."""
    seeds = set().union(*(u.rows for u in units)) if units else set()
    out = {}
    for arm in ARM_ORDER:
        mine = [u for u in units if u.arm == arm and set(u.rows) == seeds]
        if mine:
            d = decide([u.candidate() for u in mine], labels_by_id=labels_by_id, n_boot=n_boot, seed=seed)
            out[arm] = mine[d.chosen]
    return out


def declared(units: list[Unit], card: Card | None, labels_by_id: dict[str, int], *, n_boot: int,
             seed: int = 0) -> list[Comparison]:
    """The family the report declares before reading test: per backbone with both arms, head minus fine-tune, and
    the headline (the choice minus its runner-up, unless that pair is already one of them); Holm-adjusted."""
    by = {u.key: u for u in units}
    family = [compare(by[(b, "head")], by[(b, "finetune")], labels_by_id, what="head minus fine-tune",
                      n_boot=n_boot, seed=seed)
              for b in sorted({u.backbone for u in units}) if (b, "head") in by and (b, "finetune") in by]
    pairs = {frozenset((c.a.key, c.b.key)) for c in family}
    if card is not None and card.headline is not None and \
            frozenset((card.headline.a.key, card.headline.b.key)) not in pairs:
        family.append(card.headline)
    adjusted = holm([c.diff.p for c in family])
    return [Comparison(what=c.what, a=c.a, b=c.b, diff=c.diff, p_holm=p) for c, p in zip(family, adjusted)]


def holm_of(comparisons: list[Comparison], a: Unit, b: Unit) -> Comparison | None:
    """The declared comparison of ``a`` and ``b`` (either order), with its Holm-adjusted p-value."""
    return next((c for c in comparisons if {c.a.key, c.b.key} == {a.key, b.key}), None)


UNIT_COLUMNS = ["backbone", "arm", "methods", "n_seeds", "mean", "lo", "hi", "spread", "val_mean", "cost",
                "infer_ms", "chosen", "rows"]


def units_table(units: list[Unit], card: Card | None, labels_by_id: dict[str, int], *, n_boot: int,
                seed: int = 0) -> pd.DataFrame:
    """One line per unit (summary.csv): each seed's method, test mean per-class accuracy (mean over split seeds,
    class-stratified interval, split-resampling spread), mean val score, training seconds incl. features,
    inference ms per image, whether the card chose it, and its rows."""
    chosen = None if card is None else card.chosen.key
    records = []
    for u in units:
        est = accuracy(u, labels_by_id, n_boot=n_boot, seed=seed) if labels_by_id else None
        test = [r.metrics.mean_per_class for r in u.rows.values()]
        records.append({"backbone": u.backbone, "arm": u.arm, "methods": u.methods(), "n_seeds": len(u.rows),
                        "mean": float(np.mean(test)), "lo": est.lo if est else None, "hi": est.hi if est else None,
                        "spread": float(np.std(test, ddof=1)) if len(test) > 1 else None, "val_mean": u.val_score,
                        "cost": u.cost_s, "infer_ms": 1000 * u.infer_s, "chosen": u.key == chosen,
                        "rows": ",".join(str(u.rows[s].index) for s in u.seeds)})
    return pd.DataFrame.from_records(records, columns=UNIT_COLUMNS)
