"""Turn a run's ``results.jsonl`` rows into tables.

Nothing here computes a test metric of a row: every test number is copied from a row, so each figure in the
report traces back to one line of ``results.jsonl`` (its ``row`` index is kept in every table). Per
(backbone, arm, split seed) the row the report calls chosen is the one with the best **val** mean per-class
accuracy (an exact tie: the cheaper, then the earlier row; with the tuner there is one row per group anyway).
Test never takes part in a choice. The paired statistics (intervals, p-values) are ``reports.decision``'s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports.decision import Comparison
from reports.stats import McNemar, mcnemar
from study.protocol import best_then_cheapest, class_stratified, paired_parts
from study.results import ENSEMBLE, FUSED_PREFIX, ResultRow  # noqa: F401 (the arms' names, for render and plots)

RESULT_COLUMNS = [
    "row", "kind", "arm", "backbone", "method", "feature_set", "tta", "split_seed", "draw_seed", "k_per_class",
    "fit_on", "n_variants", "chosen_trial", "views", "val_mean_per_class", "val_log_loss",
    "top1", "top1_lo", "top1_hi", "mean_per_class", "mean_per_class_lo", "mean_per_class_hi",
    "mean_per_class_strat_lo", "mean_per_class_strat_hi",
    "top5", "macro_f1", "macro_f1_lo", "macro_f1_hi",
    "train_s", "predict_s", "feature_s", "trainable_params", "total_params", "epochs_run",
    "n_train", "n_val", "n_test", "hyperparams", "cache_key", "manifest_hash", "git_sha",
]


def results_table(rows: list[ResultRow], intervals: dict | None = None) -> pd.DataFrame:
    """One line per row (results.csv); ``intervals`` (row index -> lo, hi): the class-stratified interval of a
    row's test mean per-class accuracy (``decision.row_interval``), beside the row's own image-level one."""
    intervals = intervals or {}
    records = []
    for r in rows:
        m = r.metrics
        rec = {
            "row": r.index, "kind": r.kind, "arm": r.arm, "backbone": r.backbone, "method": r.method,
            "feature_set": r.feature_set, "tta": r.tta, "split_seed": r.split_seed, "draw_seed": r.draw_seed,
            "k_per_class": r.k_per_class,
            "fit_on": r.fit_on, "n_variants": r.n_variants,
            "chosen_trial": r.selection.best.extra.get("trial") if r.selection else None, "views": r.views,
            "val_mean_per_class": r.val_mean_per_class, "val_log_loss": r.val_log_loss,
            "top1": m.top1, "mean_per_class": m.mean_per_class, "top5": m.top5, "macro_f1": m.macro_f1,
            "train_s": r.train_s, "predict_s": r.predict_s, "feature_s": r.feature_s,
            "trainable_params": r.trainable_params, "total_params": r.total_params, "epochs_run": r.epochs_run,
            "n_train": r.n_train, "n_val": r.n_val, "n_test": r.n_test,
            "hyperparams": _compact(r.hyperparams), "cache_key": r.cache_key, "manifest_hash": r.manifest_hash,
            "git_sha": r.git_sha,
        }
        for key in ("top1", "mean_per_class", "macro_f1"):
            rec[f"{key}_lo"], rec[f"{key}_hi"] = m.ci95.get(key, (None, None))
        rec["mean_per_class_strat_lo"], rec["mean_per_class_strat_hi"] = intervals.get(r.index, (None, None))
        records.append(rec)
    # A nullable integer: main rows have no draw seed, and a float column would print seed 1 as 1.0.
    return pd.DataFrame.from_records(records, columns=RESULT_COLUMNS).astype({"draw_seed": "Int64",
                                                                              "chosen_trial": "Int64"})


def per_class_table(rows: list[ResultRow]) -> pd.DataFrame:
    records = []
    for r in rows:
        for c, acc in enumerate(r.metrics.per_class_acc):
            records.append({"row": r.index, "kind": r.kind, "backbone": r.backbone, "method": r.method,
                            "feature_set": r.feature_set, "split_seed": r.split_seed, "draw_seed": r.draw_seed,
                            "label": c, "class_name": r.class_names[c] if c < len(r.class_names) else str(c),
                            "accuracy": acc})
    columns = ["row", "kind", "backbone", "method", "feature_set", "split_seed", "draw_seed", "label", "class_name",
               "accuracy"]
    return pd.DataFrame.from_records(records, columns=columns).astype({"draw_seed": "Int64"})


def main_results(results: pd.DataFrame) -> pd.DataFrame:
    return results[results.kind.isin(["head", "finetune"])]


def chosen_per_seed(results: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, arm, split seed): the val-chosen row (an exact val tie: the cheaper, then the earlier row).
    Each seed is a full replicate of the protocol — choose on that seed's val, score that seed's test once."""
    main = main_results(results)
    main = main.assign(_cost=main["train_s"] + main["feature_s"].astype(float).fillna(0))
    picks = [part.index[best_then_cheapest(part.val_mean_per_class.tolist(), part._cost.tolist(), part.row.tolist())]
             for _, part in main.groupby(["backbone", "arm", "split_seed"], sort=True)]
    return main.loc[picks].drop(columns="_cost").sort_values(["backbone", "arm", "split_seed"])


@dataclass(frozen=True)
class SeedVerdict:
    seed: int
    head: pd.Series          # the seed's val-chosen head row (a results_table row)
    finetune: pd.Series
    test: McNemar            # on top-1 correctness
    diff: float              # head minus fine-tune, test mean per-class accuracy (fraction)
    lo: float                # its class-stratified interval on this seed's test images
    hi: float


@dataclass(frozen=True)
class BackboneVerdict:
    """Head vs fine-tune on one backbone: per split seed the val-chosen pair, and over seeds the declared
    comparison (``decision.Comparison``: mean difference, interval, p and Holm-adjusted p)."""
    backbone: str
    seeds: list[SeedVerdict]
    comparison: Comparison


def verdicts(chosen: pd.DataFrame, rows: list[ResultRow], comparisons: list[Comparison], *,
             labels_by_id: dict[str, int]) -> list[BackboneVerdict]:
    """Per backbone with both arms (the declared head-minus-fine-tune ``comparisons``): each split seed's
    val-chosen pair with McNemar on top-1 and the seed's paired interval on mean per-class accuracy."""
    out = []
    for c in comparisons:
        if c.what != "head minus fine-tune":
            continue
        part = chosen[chosen.backbone == c.a.backbone]
        per_seed = {s: (d, lo, hi) for s, d, lo, hi in c.diff.per_seed}
        seeds = []
        for seed in sorted(per_seed):
            pair = part[part.split_seed == seed]
            h, f = pair[pair.arm == "head"].iloc[0], pair[pair.arm == "finetune"].iloc[0]
            seeds.append(SeedVerdict(seed=int(seed), head=h, finetune=f, diff=per_seed[seed][0],
                                     lo=per_seed[seed][1], hi=per_seed[seed][2],
                                     test=mcnemar(rows[int(h.row)], rows[int(f.row)], labels_by_id=labels_by_id)))
        out.append(BackboneVerdict(backbone=c.a.backbone, seeds=seeds, comparison=c))
    return out


def whole_train_draws(rows: list[ResultRow]) -> set[int]:
    """Indices of the few-shot rows whose draw took every train image of its split seed (its ``n_train`` is the
    split's, as its head and fine-tune rows record it): such draws are one fit whatever their seed. Other draws
    are different fits on different images, even where their test predictions agree."""
    full: dict[int, set] = {}
    for r in rows:
        if r.kind in ("head", "finetune"):
            full.setdefault(r.split_seed, set()).add(r.n_train)
    return {r.index for r in rows if r.kind == "fewshot" and r.n_train in full.get(r.split_seed, ())}


def fewshot_table(results: pd.DataFrame, rows: list[ResultRow]) -> pd.DataFrame:
    """Few-shot points: mean and sd over *distinct* draws. Draws that took the whole train set and gave identical
    test predictions count as one: three copies of one fit are not three seeds with sd 0."""
    few = results[results.kind == "fewshot"]
    whole = whole_train_draws(rows)
    records = []
    # Each (arm, k, draw) is a search of its own, so draws of one k may choose different methods: one line per
    # arm, backbone and k, naming what its draws chose.
    for (backbone, arm, k), part in few.groupby(["backbone", "arm", "k_per_class"], sort=True):
        distinct: dict[tuple, float] = {}
        for i in map(int, part["row"]):
            distinct.setdefault(rows[i].test_pred if i in whole else i, rows[i].metrics.mean_per_class)
        values = list(distinct.values())
        records.append({"arm": arm, "backbone": backbone, "method": ", ".join(sorted(set(part.method))),
                        "feature_set": ", ".join(sorted(set(part.feature_set))),
                        "k_per_class": int(k),
                        "n_draws": len(part), "n_distinct": len(values), "mean": float(np.mean(values)),
                        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                        "rows": ", ".join(map(str, part["row"]))})
    return pd.DataFrame.from_records(records, columns=["arm", "backbone", "method", "feature_set", "k_per_class",
                                                       "n_draws", "n_distinct", "mean", "sd", "rows"])


FEWSHOT_PAIR_COLUMNS = ["backbone", "k_per_class", "pairs", "head", "finetune", "diff", "lo", "hi", "p", "rows"]


def fewshot_pairs(rows: list[ResultRow], labels_by_id: dict[str, int], *, n_boot: int,
                  seed: int = 0) -> pd.DataFrame:
    """Per backbone and k: the fine-tune minus the head, test mean per-class accuracy, over the fits both arms made
    on the same drawn images (same backbone, split seed and draw seed); a pair repeated exactly (at k = the whole
    pool every draw is one fit) counts once. The interval resamples both the pairs (what other draws would have
    given) and, within class, the test images; ``p`` is its bootstrap p-value of 0."""
    fits: dict[tuple, dict] = {}
    whole = whole_train_draws(rows)
    for r in rows:
        if r.kind == "fewshot":
            fits.setdefault((r.backbone, int(r.k_per_class)), {}).setdefault(r.arm, {})[(r.split_seed, r.seed)] = r
    records = []
    for (backbone, k), arms in sorted(fits.items()):
        head, ft = arms.get("head", {}), arms.get("finetune", {})
        distinct = {(ft[key].test_sample_id, ft[key].test_pred, head[key].test_pred)
                    if {ft[key].index, head[key].index} <= whole else key: key for key in sorted(set(head) & set(ft))}
        keys = sorted(distinct.values())
        if not keys or not labels_by_id:
            continue
        parts = paired_parts({key: (ft[key].test_sample_id, ft[key].test_pred) for key in keys},
                             {key: (head[key].test_sample_id, head[key].test_pred) for key in keys}, labels_by_id)
        boot = class_stratified(parts, n_boot=n_boot, seed=seed, resample_parts=len(parts) > 1)
        lo, hi = boot.interval()
        records.append({"backbone": backbone, "k_per_class": k, "pairs": len(keys),
                        "head": float(np.mean([head[key].metrics.mean_per_class for key in keys])),
                        "finetune": float(np.mean([ft[key].metrics.mean_per_class for key in keys])),
                        "diff": boot.observed, "lo": lo, "hi": hi, "p": boot.p_value,
                        "rows": ", ".join(f"{head[key].index}/{ft[key].index}" for key in keys)})
    return pd.DataFrame.from_records(records, columns=FEWSHOT_PAIR_COLUMNS)


def crossovers(pairs: pd.DataFrame) -> dict[str, int | None]:
    """Per backbone: the smallest k at which the fine-tune is ahead with its interval above 0; None where it
    never is (a gap whose interval holds 0 is no crossover)."""
    return {b: next((int(r.k_per_class) for r in part.sort_values("k_per_class").itertuples() if r.lo > 0), None)
            for b, part in pairs.groupby("backbone", sort=True)}


# The heads' feature sets set against clean, in the report's column order, with their names there.
FEATURE_SET_NAMES = {"aug": "+ augmented views", "stages": "stages (pooled + last:1 cut)"}


def compared_feature_sets(results: pd.DataFrame) -> list[str]:
    """The feature sets of ``FEATURE_SET_NAMES`` that any head of the run was trained on."""
    trained = set(results[results.kind == "head"].feature_set)
    return [f for f in FEATURE_SET_NAMES if f in trained]


def feature_set_effects(results: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, head) trained on clean and on another set of ``FEATURE_SET_NAMES``: on the ``clean``
    line the mean val and test score over its split seeds; on each other set's line its mean minus clean's,
    on the split seeds both have (paired by seed). ``val``/``test`` are None where a side has no value;
    ``n_seeds`` counts the line's seeds, ``rows`` its results rows."""
    heads = results[results.kind == "head"]
    records = []
    for (backbone, method), part in heads.groupby(["backbone", "method"]):
        by_set = {f: g for f, g in part.groupby("feature_set")}
        if "clean" not in by_set or not any(f in by_set for f in FEATURE_SET_NAMES):
            continue
        clean, key = by_set["clean"], {"backbone": backbone, "method": method}
        records.append({**key, "feature_set": "clean", "n_seeds": clean.split_seed.nunique(),
                        "val": _mean(clean.val_mean_per_class), "test": _mean(clean.mean_per_class),
                        "rows": list(clean.row)})
        for f in (f for f in FEATURE_SET_NAMES if f in by_set):
            same = by_set[f][by_set[f].split_seed.isin(clean.split_seed)]
            ref = clean[clean.split_seed.isin(same.split_seed)]
            records.append({**key, "feature_set": f, "n_seeds": same.split_seed.nunique(),
                            "val": _diff(same.val_mean_per_class, ref.val_mean_per_class),
                            "test": _diff(same.mean_per_class, ref.mean_per_class), "rows": list(same.row)})
    return pd.DataFrame.from_records(records, columns=["backbone", "method", "feature_set", "n_seeds", "val", "test",
                                                       "rows"])


def _mean(values: pd.Series) -> float | None:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def _diff(a: pd.Series, b: pd.Series) -> float | None:
    """Mean of ``a`` minus mean of ``b``; None where either has no value."""
    ma, mb = _mean(a), _mean(b)
    return None if ma is None or mb is None else ma - mb


def _compact(obj) -> str:
    if not obj:
        return ""
    return "; ".join(f"{k}={v}" for k, v in sorted(obj.items()))
