"""Turn a run's ``results.jsonl`` rows into tables, and make every choice the report names — on val.

Nothing here computes a test metric: every test number is copied from a row, so each figure in the
report traces back to one line of ``results.jsonl`` (its ``row`` index is kept in every table). What
this module adds is the *choice*: per (backbone, arm) the variant the report calls chosen is the one
with the best **val** mean per-class accuracy (ties: lower val log-loss, then the earlier row), and
over several split seeds the one with the best mean val score. Test never takes part in a choice,
so a McNemar p-value on the chosen pair is a test of a pair fixed before test was looked at.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports.stats import McNemar, mcnemar
from study.protocol import val_order
from study.results import ENSEMBLE, FUSED_PREFIX, ResultRow  # noqa: F401 (the arms' names, for render and plots)

RESULT_COLUMNS = [
    "row", "kind", "arm", "backbone", "method", "feature_set", "tta", "split_seed", "draw_seed", "k_per_class",
    "fit_on", "n_variants", "chosen_trial", "views", "val_mean_per_class", "val_log_loss",
    "top1", "top1_lo", "top1_hi", "mean_per_class", "mean_per_class_lo", "mean_per_class_hi",
    "top5", "macro_f1", "macro_f1_lo", "macro_f1_hi",
    "train_s", "predict_s", "feature_s", "trainable_params", "total_params", "epochs_run",
    "n_train", "n_val", "n_test", "hyperparams", "cache_key", "manifest_hash", "git_sha",
]
SUMMARY_COLUMNS = ["backbone", "arm", "method", "feature_set", "n_seeds", "mean", "sd", "val_mean", "chosen", "rows"]
VARIANT_COLUMNS = SUMMARY_COLUMNS + ["val_loss", "lo", "hi", "cost", "row"]
VARIANT = ["backbone", "arm", "method", "feature_set"]
# Names the arms write (not imported from them: that would pull the feature store and torch into reports).


def label(row) -> str:
    """How a result is named in tables and plots, e.g. 'lr (aug)' or 'ft:last:1 (light)'."""
    return f"{row.method} ({row.feature_set})"


def results_table(rows: list[ResultRow]) -> pd.DataFrame:
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
    """Per (backbone, arm, split seed): the val-chosen row. Each seed is a full replicate of the
    protocol — choose on that seed's val, score that seed's test once — so the per-seed verdicts
    are what the over-seeds verdict averages."""
    ordered = val_order(main_results(results), val="val_mean_per_class", loss="val_log_loss")
    return ordered.groupby(["backbone", "arm", "split_seed"], sort=True).head(1).sort_values(
        ["backbone", "arm", "split_seed"])


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (backbone, arm, method, features) over its split seeds: test mean per-class accuracy
    (``mean`` ± ``sd``; ``lo``/``hi``, the first seed's 95% CI), the mean val score and log-loss, the mean
    cost (training + feature seconds), and ``chosen`` for the variant with the best mean val score of its
    (backbone, arm) — the variant the report names. ``SUMMARY_COLUMNS`` are what ``summary.csv`` keeps."""
    main = main_results(results)
    if main.empty:
        return pd.DataFrame(columns=VARIANT_COLUMNS)
    g = main.assign(cost=main["train_s"] + main["feature_s"].astype(float).fillna(0)).groupby(VARIANT, sort=True)
    summary = pd.DataFrame({
        "n_seeds": g["split_seed"].nunique(),
        "mean": g["mean_per_class"].mean(),
        # ddof=1: the spread of a method across split seeds, an estimate from a sample of seeds.
        "sd": g["mean_per_class"].std(ddof=1),
        "val_mean": g["val_mean_per_class"].mean(),
        "val_loss": g["val_log_loss"].mean(),
        "lo": g["mean_per_class_lo"].first(), "hi": g["mean_per_class_hi"].first(), "cost": g["cost"].mean(),
        "row": g["row"].min(),
        "rows": g["row"].apply(lambda s: ",".join(map(str, sorted(s)))),
    }).reset_index()
    ordered = val_order(summary, val="val_mean", loss="val_loss")
    chosen_idx = set(ordered.groupby(["backbone", "arm"]).head(1).index)
    summary["chosen"] = summary.index.isin(chosen_idx)
    return summary[VARIANT_COLUMNS]


def val_best_per_arm(summary: pd.DataFrame) -> pd.DataFrame:
    """Each arm's variant with the best mean val score over every backbone (ties: the lower mean val
    log-loss, then the earlier row), best first: the variants the cost figure rings."""
    return val_order(summary, val="val_mean", loss="val_loss").groupby("arm").head(1)


def val_ties(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, arm) whose chosen variant shares its best mean val score with others: how many
    tie. There the choice rests on val log-loss (then row order), which a saturated val split cannot
    make meaningful, so the report says so."""
    chosen = chosen_variants(summary)
    records = []
    for c in chosen.itertuples():
        same = summary[(summary.backbone == c.backbone) & (summary.arm == c.arm) & (summary.val_mean == c.val_mean)]
        if len(same) > 1:
            records.append({"backbone": c.backbone, "arm": c.arm, "n_tied": len(same), "val_mean": c.val_mean,
                            "method": c.method, "feature_set": c.feature_set})
    return pd.DataFrame.from_records(records, columns=["backbone", "arm", "n_tied", "val_mean", "method",
                                                       "feature_set"])


def chosen_variants(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary.chosen]


def best_overall(summary: pd.DataFrame, *, arm: str | None = None) -> pd.Series | None:
    """The headline: among every backbone's chosen variants (of ``arm`` only, when given), the best mean val score."""
    chosen = chosen_variants(summary)
    if arm is not None:
        chosen = chosen[chosen.arm == arm]
    if chosen.empty:
        return None
    return val_order(chosen.assign(_loss=np.nan), val="val_mean", loss="_loss").iloc[0]


def rows_of(results: pd.DataFrame, variant: pd.Series) -> pd.DataFrame:
    """The rows of one variant, one per split seed, seed order."""
    mask = np.logical_and.reduce([results[c] == variant[c] for c in VARIANT])
    return results[mask & results.kind.isin(["head", "finetune"])].sort_values("split_seed")


@dataclass(frozen=True)
class SeedVerdict:
    seed: int
    head: pd.Series          # the seed's val-chosen head row (a results_table row)
    finetune: pd.Series
    test: McNemar

    @property
    def diff(self) -> float:
        """Head minus fine-tune, test mean per-class accuracy (fraction)."""
        return float(self.head.mean_per_class - self.finetune.mean_per_class)


@dataclass(frozen=True)
class BackboneVerdict:
    backbone: str
    seeds: list[SeedVerdict]

    @property
    def mean_diff(self) -> float:
        return float(np.mean([s.diff for s in self.seeds]))

    @property
    def sd_diff(self) -> float | None:
        return float(np.std([s.diff for s in self.seeds], ddof=1)) if len(self.seeds) > 1 else None

    @property
    def wins(self) -> dict[str, int]:
        d = [s.diff for s in self.seeds]
        return {"head": sum(x > 0 for x in d), "finetune": sum(x < 0 for x in d), "tie": sum(x == 0 for x in d)}


def verdicts(chosen: pd.DataFrame, rows: list[ResultRow], *, labels_by_id: dict[str, int]) -> list[BackboneVerdict]:
    """Head vs fine-tune per backbone, from ``chosen_per_seed``: per seed the val-chosen pair and McNemar on
    its paired test correctness; over seeds the mean paired difference, its sd and the wins per arm."""
    out = []
    for backbone, part in chosen.groupby("backbone", sort=True):
        seeds = []
        for seed, pair in part.groupby("split_seed", sort=True):
            by_arm = {r.arm: r for _, r in pair.iterrows()}
            if {"head", "finetune"} <= set(by_arm):
                h, f = by_arm["head"], by_arm["finetune"]
                seeds.append(SeedVerdict(seed=int(seed), head=h, finetune=f,
                                         test=mcnemar(rows[int(h.row)], rows[int(f.row)], labels_by_id=labels_by_id)))
        if seeds:
            out.append(BackboneVerdict(backbone=backbone, seeds=seeds))
    return out


def fewshot_table(results: pd.DataFrame, rows: list[ResultRow]) -> pd.DataFrame:
    """Few-shot points: mean and sd over *distinct* draws. Draws with identical test predictions (at
    k = the pool size every draw takes every image, so the seeds make the same fit) count as one:
    three copies of one fit are not three seeds with sd 0."""
    few = results[results.kind == "fewshot"]
    records = []
    for (backbone, method, fset, k), part in few.groupby(["backbone", "method", "feature_set", "k_per_class"]):
        distinct: dict[tuple, float] = {}
        for i in part["row"]:
            distinct.setdefault(rows[int(i)].test_pred, rows[int(i)].metrics.mean_per_class)
        values = list(distinct.values())
        records.append({"arm": part.arm.iloc[0], "backbone": backbone, "method": method, "feature_set": fset,
                        "k_per_class": int(k),
                        "n_draws": len(part), "n_distinct": len(values), "mean": float(np.mean(values)),
                        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                        "rows": ", ".join(map(str, part["row"]))})
    return pd.DataFrame.from_records(records, columns=["arm", "backbone", "method", "feature_set", "k_per_class",
                                                       "n_draws", "n_distinct", "mean", "sd", "rows"])


FEWSHOT_ARM_COLUMNS = ["arm", "k_per_class", "mean", "sd", "n", "n_rows", "variants", "rows"]


def fewshot_arms(results: pd.DataFrame, rows: list[ResultRow]) -> pd.DataFrame:
    """Per (arm, k per class): the mean and sd of test mean per-class accuracy over the arm's *distinct*
    few-shot fits, over every split seed and draw.

    Each split seed's few-shot rows are that seed's val-chosen variant of the arm (the classify and
    fine-tune stages pick it), so one arm's curve may pool several variants; ``variants`` names them.
    Rows with identical test ids and predictions are one fit counted once (the rule of
    ``fewshot_table``): the test ids are part of the key because different split seeds have different
    test sets, and a coincidence of predictions across them is not a repeated fit.
    """
    few = results[results.kind == "fewshot"]
    records = []
    for (arm, k), part in few.groupby(["arm", "k_per_class"], sort=True):
        distinct: dict[tuple, float] = {}
        for i in part["row"]:
            r = rows[int(i)]
            distinct.setdefault((r.test_sample_id, r.test_pred), r.metrics.mean_per_class)
        values = list(distinct.values())
        variants = sorted({f"{b} {m} ({f})" for b, m, f in zip(part.backbone, part.method, part.feature_set)})
        records.append({"arm": arm, "k_per_class": int(k), "mean": float(np.mean(values)),
                        # ddof=1: the spread of fits drawn from many possible draws and splits, a sample sd.
                        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                        "n": len(values), "n_rows": len(part), "variants": "; ".join(variants),
                        "rows": ", ".join(map(str, sorted(part["row"])))})
    return pd.DataFrame.from_records(records, columns=FEWSHOT_ARM_COLUMNS)


def paired_gaps(results: pd.DataFrame, rows: list[ResultRow]) -> dict[int, tuple[float, int]]:
    """Per k: the fine-tune arm's minus the head arm's test mean per-class accuracy, averaged over the draws
    both arms fitted (the same split's test set and the same draw seed, so the same drawn images), and how
    many such draws there are. The head arm may take more draws than the fine-tune (it is cheap); comparing
    their pooled means would set one fine-tune draw against the head's average luck."""
    few = results[results.kind == "fewshot"]
    fits: dict[tuple[int, str], dict] = {}
    for i, arm, k, draw in zip(few["row"], few["arm"], few["k_per_class"], few["draw_seed"]):
        r = rows[int(i)]
        fits.setdefault((int(k), arm), {})[(r.test_sample_id, int(draw))] = r.metrics.mean_per_class
    out = {}
    for k in sorted({k for k, _ in fits}):
        head, ft = fits.get((k, "head"), {}), fits.get((k, "finetune"), {})
        shared = [key for key in ft if key in head]
        if shared:
            out[k] = (float(np.mean([ft[key] - head[key] for key in shared])), len(shared))
    return out


def fewshot_gaps(arms_table: pd.DataFrame, paired: dict[int, tuple[float, int]] | None = None) -> dict[int, float]:
    """Per k both arms measured (ascending): the fine-tune arm's minus the head arm's test mean per-class
    accuracy, on the draws both fitted where ``paired`` (``paired_gaps``) has any for that k, else between
    the arms' pooled means (``fewshot_arms``)."""
    means = {arm: dict(zip(part.k_per_class.astype(int), part["mean"])) for arm, part in arms_table.groupby("arm")}
    head, ft = means.get("head", {}), means.get("finetune", {})
    paired = paired or {}
    return {k: paired[k][0] if k in paired else float(ft[k] - head[k]) for k in sorted(set(head) & set(ft))}


def crossover(arms_table: pd.DataFrame, paired: dict[int, tuple[float, int]] | None = None) -> int | None:
    """The smallest k at which the fine-tune arm is ahead of the head arm (``fewshot_gaps`` above 0);
    None when it never is (or one arm has no curve)."""
    return next((k for k, gap in fewshot_gaps(arms_table, paired).items() if gap > 0), None)


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
