"""Render ``report.md``: one function per section, each formatting ``ReportInputs`` into markdown lines.

Every number comes from ``reports.tables.Tables`` (computed from ``results.jsonl`` before rendering; nothing
here computes one) and is formatted from a results row whose index is in the table's ``row`` column; the
rest is the run's ``skipped.jsonl``, ``provenance.json``, ``config.resolved.toml`` and the dataset stage's
``summary.json``.
"""
from __future__ import annotations

import json
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from reports.collect import ENSEMBLE, FEATURE_SET_NAMES, BackboneVerdict
from reports.fmt import count, figure_links, kind_name, md_table, p_text, pct, pct_ci, pts, pts_ci, seconds
from reports.sections import section_card, section_limitations, section_per_source
from reports.tables import Tables
from study.results import ResultRow

PUBLISHED = [
    # (method, figure, protocol, source)
    ("SVM on DeCAF6 (AlexNet) features", 86.9, "30 train images/class, mean per-class accuracy, 101 classes",
     "Donahue et al., DeCAF, ICML 2014"),
    ("Fine-tuned ResNet-50", 91.8, "30 train images/class, mean per-class accuracy",
     "Kornblith, Shlens & Le, Do Better ImageNet Models Transfer Better?, CVPR 2019"),
    ("Fine-tuned Inception v3", 94.3, "30 train images/class, mean per-class accuracy",
     "Kornblith, Shlens & Le, CVPR 2019"),
    ("Fine-tuned MobileNetV2", 89.1, "30 train images/class, mean per-class accuracy",
     "Kornblith, Shlens & Le, CVPR 2019"),
    ("VTAB fine-tuned ResNet-50", 94.1, "full Caltech 101 training set (not 30/class), top-1",
     "Zhai et al., VTAB, 2019"),
]


@dataclass(frozen=True)
class ReportInputs:
    tables: Tables              # every number the report shows
    summary: dict | None        # dataset summary.json
    skips: list[dict]
    provenance: dict
    config: dict
    figures: dict[str, str]     # figure name -> file name in the run folder
    worst_n: int = 10
    run_dir: Path | None = None  # the run folder the predict commands name


def section_answer(inp: ReportInputs) -> list[str]:
    t = inp.tables
    out = ["## Findings", "", "### Chosen head vs chosen fine-tune, per backbone", "", STATISTICS_NOTE, ""]
    out += declared_table(t)
    for v in t.verdicts:
        out += verdict_lines(v)
    paired = {v.backbone for v in t.verdicts}
    for backbone, part in t.chosen_per_seed.groupby("backbone"):
        if backbone not in paired:
            r = part.iloc[0]
            out.append(f"- **{backbone}**: only {kind_name(r.arm)} results: chosen on val `{r.method} "
                       f"({r.feature_set})`, test {pct(r.mean_per_class)}.")
    if t.main.empty:
        out.append("No head or fine-tuning result in this run.")
    return out + [""]


STATISTICS_NOTE = (
    "The primary test is on the headline metric, mean per-class accuracy: the paired difference of two models on "
    "the same test images, with a 95% bootstrap interval that resamples test images within each class (every "
    "class keeps its images in every resample) and its bootstrap p-value. The comparisons below were declared "
    "before test was read — per backbone the val-chosen head against the val-chosen fine-tune, and the decision "
    "against its runner-up — and their p-values are Holm-adjusted as one family. Over split seeds a difference is "
    "the mean over the seeds, its interval resampling each image once for all seeds (the seeds share most test "
    "images); the sd of the per-seed differences is a split-resampling spread, not a spread of replicates. "
    "McNemar's exact test is on top-1 correctness, shown for reference.")


def declared_table(t: Tables) -> list[str]:
    if not t.comparisons:
        return []
    body = [[c.what, f"{unit_label(c.a)} − {unit_label(c.b)}", str(len(c.diff.per_seed)),
             pts_ci(c.diff.value, c.diff.lo, c.diff.hi), p_text(c.diff.p), p_text(c.p_holm),
             "–" if c.diff.spread is None else f"{100 * c.diff.spread:.1f}", _verdict(c)] for c in t.comparisons]
    return md_table(["comparison", "a − b", "split seeds", "a − b, mean per-class (pts) [95% interval]",
                     "p (bootstrap)", "p (Holm)", "split-resampling spread (pts)", "at 5% after Holm"], body)


def unit_label(u) -> str:
    return f"{u.backbone} {kind_name(u.arm)}"


def _verdict(c) -> str:
    if c.p_holm is None or c.p_holm >= 0.05:
        return "no difference shown"
    return f"{unit_label(c.a if c.diff.value > 0 else c.b)} ahead"


def verdict_lines(v: BackboneVerdict) -> list[str]:
    """One backbone's verdict over its seeds (the declared comparison), then a line per seed."""
    body = [[str(s.seed), f"`{s.head.method} ({s.head.feature_set})` (row {int(s.head.row)})",
             pct(s.head.val_mean_per_class), pct(s.head.mean_per_class),
             f"`{s.finetune.method} ({s.finetune.feature_set})` (row {int(s.finetune.row)})",
             pct(s.finetune.val_mean_per_class), pct(s.finetune.mean_per_class), pts_ci(s.diff, s.lo, s.hi),
             f"{s.test.p_value:.3g}", str(s.test.only_a), str(s.test.only_b)] for s in v.seeds]
    c, s0 = v.comparison, v.seeds[0]
    spread = "" if c.diff.spread is None else f", split-resampling spread {100 * c.diff.spread:.1f} pts"
    out = [f"- **{v.backbone}**: head minus fine-tune {pts_ci(c.diff.value, c.diff.lo, c.diff.hi)} pts over "
           f"{len(v.seeds)} split seed{'s' if len(v.seeds) > 1 else ''}{spread}; p = {p_text(c.diff.p)}, Holm-adjusted "
           f"{p_text(c.p_holm)}: {_verdict(c)}; training cost incl. features (seed {s0.seed}) "
           f"{seconds(_cost(s0.head))} s vs {seconds(_cost(s0.finetune))} s.", ""]
    return out + md_table(["seed", "chosen head", "val %", "test %", "chosen fine-tune", "val %", "test %",
                           "head − fine-tune, mean per-class (pts) [95% interval]", "McNemar p (top-1)",
                           "only head right (top-1)", "only fine-tune right (top-1)"], body)


def section_budget(inp: ReportInputs) -> list[str]:
    """What each arm was allowed to try and what it found by each trial: the verdict against the budget."""
    t = inp.tables
    if t.budget.empty:
        return []
    out = ["### Both arms' tuning budgets", "",
           "Each (backbone, arm, split seed) ran the same number of tuner trials (`tune.trials`; a pruned fine-tune "
           "trial counts as one), each drawn by the same sampler from its arm's declared space and scored on val. "
           "*Still rising*: split seeds on which the best val so far improved during the last third of the trials "
           "(a larger budget might have found more). *At an edge*: chosen values within 5% of an end of their "
           "range (the space may be too narrow there).", ""]
    body = [[r.backbone, kind_name(r.arm), r.trials, str(r.pruned), seconds(r.seconds_per_seed), pct(r.best_val),
             f"{r.rising_seeds} of {r.split_seeds}", r.chosen_at_edge or "none"] for r in t.budget.itertuples()]
    out += md_table(["backbone", "arm", "trials per split seed", "pruned", "trial seconds per seed",
                     "best val % (mean over seeds)", "still rising at the end", "chosen values at an edge"], body)
    if not t.at_equal_trials.empty:
        out += ["The arms after the same number of trials (best val % so far, mean over split seeds):", ""]
        out += md_table(["backbone", "trials", "frozen features + head", "fine-tune", "head − fine-tune (pts)"],
                        [[r.backbone, str(r.trials), pct(r.head), pct(r.finetune), f"{100 * r.lead:+.1f}"]
                         for r in t.at_equal_trials.itertuples()])
    return out + figure_links(inp.figures, anytime="Best val so far against trials and seconds")


def section_seeds(inp: ReportInputs) -> list[str]:
    v = inp.tables.variants
    out = ["### Every (backbone, arm) over split seeds", ""]
    if v.empty:
        return out + ["No head or fine-tuning result in this run.", ""]
    body = [[r.backbone, kind_name(r.arm), r.methods, str(int(r.n_seeds)), pct(r.val_mean),
             pct_ci(r["mean"], r.lo, r.hi), "–" if pd.isna(r.spread) else f"{100 * r.spread:.1f}", seconds(r.cost),
             f"{r.infer_ms:.2f}", "**chosen**" if r.chosen else "", r.rows] for _, r in v.iterrows()]
    out += md_table(["backbone", "arm", "chosen method per split seed", "seeds", "val mean per-class % (mean)",
                     "test mean per-class % (mean [95% interval])", "split-resampling spread (pts)",
                     "train s incl. features (mean)", "inference ms / image past the frozen backbone", "decision",
                     "rows"], body)
    return out + ["Each (backbone, arm) ran one search per split seed, which chose its method on that seed's val; "
                  "the interval resamples test images within class once for all seeds. `summary.csv` holds this "
                  "table; `results.csv` each row with its own intervals.", ""]


def _cost(r) -> float:
    return r.train_s + (0 if r.feature_s is None or pd.isna(r.feature_s) else r.feature_s)


DEDUP_NOTE = ("; one copy kept, so no exact copy and no near-copy that pHash pairs (a re-encode, resize or slight "
              "re-crop) is in two splits. pHash does not pair the same photograph cropped or framed differently "
              "(see Limitations).")


def section_dataset(inp: ReportInputs) -> list[str]:
    s = inp.summary
    out = ["## Dataset", ""]
    if not s:
        return out + ["No dataset summary found (the dataset stage has not run into this --out).", ""]
    out += md_table(["source", "kind", "path", "images"],
                    [[x["name"], x.get("kind", ""), f"`{x.get('path', '')}`", count(x.get("n_images"))]
                     for x in s.get("sources", [])])
    sc = s.get("split_counts", {})
    out.append(f"{s.get('n_classes', '?')} classes; {count(sc.get('train'))} train, {count(sc.get('val'))} val, "
               f"{count(sc.get('test'))} test images (manifest hash `{str(s.get('manifest_hash', ''))[:12]}`).")
    out.append("")
    excluded, dups = s.get("excluded", []), s.get("duplicates", [])
    reasons = pd.Series([e["reason"] for e in excluded]).value_counts().to_dict() if excluded else {}
    out.append(f"- Excluded files: {len(excluded)}" + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())})"
                                                       if reasons else "") + ".")
    kinds = pd.Series([d.get("kind", "?") for d in dups]).value_counts().to_dict() if dups else {}
    out.append(f"- Duplicates removed: {len(dups)}" + (f" ({', '.join(f'{k}: {v}' for k, v in kinds.items())})"
                                                        if kinds else "") + DEDUP_NOTE)
    small = [c["name"] for c in s.get("classes", []) if c.get("small")]
    out.append(f"- Classes under {s.get('small_class_threshold', 100)} images (flagged): {len(small)}"
               + (f" — {', '.join(small[:30])}{' …' if len(small) > 30 else ''}" if small else "") + ".")
    for d in s.get("dropped_classes", []):
        out.append(f"- Dropped class `{d['name']}`: {d['reason']}.")
    out.append("")
    for e in excluded[:15]:
        out.append(f"  - excluded `{e['path']}`: {e['reason']}")
    if len(excluded) > 15:
        out.append(f"  - … and {len(excluded) - 15} more (see the dataset folder's excluded.csv)")
    for key, caption in (("contact_sheet", "Contact sheet"), ("augmentations", "Augmentation policies")):
        if key in inp.figures:
            out += ["", f"![{caption}]({inp.figures[key]})"]
    return out + [""]


def section_protocol(inp: ReportInputs) -> list[str]:
    cfg = inp.config
    split = cfg.get("data", {}).get("split", {})
    res = inp.tables.results
    draws = sorted(set(res[res.kind == "fewshot"]["draw_seed"].tolist()))
    # Everything below about what each arm did is read from the rows (what the numbers were computed
    # with), not from the config, so the text cannot describe a protocol the run did not follow.
    tta = {arm: ", ".join(sorted(set(res[res.kind.isin(kinds)]["tta"]))) if not res.empty else "–"
           for arm, kinds in (("extract", ["head", "fewshot"]), ("finetune", ["finetune"]))}
    split_seeds = sorted(set(inp.tables.main["split_seed"].tolist()))
    out = [
        "## Protocol", "",
        f"- Splits are made by the dataset stage, one per split seed ({', '.join(map(str, split_seeds)) or '–'}), "
        f"stored in the manifest, and shared by every head and fine-tune of that seed: protocol "
        f"`{split.get('protocol', '?')}` "
        + (f"({split.get('train_per_class')} training images per class, of which {split.get('val_per_class')} are "
           f"validation; the rest of each class is test)." if split.get("protocol") == "per_class" else
           f"({split.get('train_fraction')} of each class to train, {split.get('val_fraction')} to validation, "
           "the rest to test)." if split.get("protocol") == "fraction" else "."),
        "- Every choice — a tuner trial of either arm, a fine-tune's epoch, each (backbone, arm)'s row and the "
        "decision — is made by mean per-class accuracy on `val` (a head search with under 10 val images of a "
        "class scores its trials by cross-validation on train+val instead, and says so): within a search an exact "
        "tie goes to the earlier trial; the decision takes a cheaper candidate whenever its val difference from "
        "the val-best is within val noise (the rule is under Decision). No val log-loss breaks a tie across "
        "families; `test` scores each final model once and takes part in no choice.",
    ]
    out += protocol_arm_lines(inp.tables.rows, inp.tables.trials)
    out += [
        f"- Test-time augmentation: heads `{tta['extract']}`, fine-tuning `{tta['finetune']}` (`hflip`: each "
        "val/test image is also seen mirrored; heads average the two embeddings, fine-tuned models their two "
        "logits)." + ("" if tta["extract"] == tta["finetune"] else " **The two arms differ here, so the comparison "
                      "is not like for like.**"),
        "- Metrics on test: top-1; top-5; **mean per-class accuracy** (the mean of per-class recalls, Caltech's "
        "headline metric); macro-F1. The rows' own 95% intervals (top-1, macro-F1) are percentile bootstrap over "
        f"test samples ({_n_boot(inp.tables.rows)} resamples); every interval on mean per-class accuracy and every "
        f"paired difference is the report's class-stratified bootstrap ({inp.tables.n_boot} resamples, seeded). "
        "They cover test sampling only; the sd over split seeds is a split-resampling spread (the seeds share "
        "images), not a spread of replicates.",
        "- Cost: training wall seconds (heads: hyperparameter sweep + refit on cached features; fine-tuning: "
        "all epochs incl. prefix-cache build) and inference wall seconds on the test set from the stored features or "
        "activations (the frozen backbone's forward pass, the same for both arms of a backbone, is not in it), on "
        "the run's device "
        f"(`{inp.provenance.get('device', '?')}`).",
        f"- Few-shot draws use seeds {', '.join(map(str, draws)) or '–'}.",
        "",
    ]
    return out


def protocol_arm_lines(rows: list[ResultRow], trials: pd.DataFrame | None = None) -> list[str]:
    """One line per arm saying what it did: its search (trials per backbone and split seed, what it chose), what
    the chosen model was fit on, which training views it saw. Built from the rows (and trials) of one split seed
    (every seed runs the same protocol), and a warning when the arms were fit on different data."""
    main = [r for r in rows if r.kind in ("head", "finetune")]
    if not main:
        return []
    seed = min(r.split_seed for r in main)
    out, fit_on = [], {}
    for arm in ("head", "finetune"):
        part = [r for r in main if r.arm == arm and r.split_seed == seed]
        if not part:
            continue
        fit_on[arm] = sorted({r.fit_on for r in part})
        views = "; ".join(sorted({_views_text(r) for r in part}))
        fit = " / ".join(f"`{f}`" for f in fit_on[arm])
        searched = [r for r in part if r.method != ENSEMBLE]
        out.append(f"- **{kind_name(arm)}**: {len(searched)} tuner search(es) per split seed ({_searches(arm)}), "
                   f"{_trial_counts(searched, trials, arm=arm, seed=seed)}; chosen on val this seed: "
                   f"{_variant_list(part)}; the chosen trial is refit on {fit}; training views: {views}.")
        ensembles = sorted({r.backbone for r in part if r.method == ENSEMBLE})
        if ensembles:
            out.append(f"- `{ENSEMBLE}` ({', '.join(f'`{b}`' for b in ensembles)}): the fine-tune arm's counterpart "
                       "of a fused feature set — each named backbone's val-chosen fine-tune of the seed, their softmax "
                       "outputs averaged; it runs no trials of its own (its members ran theirs), its val score is the "
                       "average's on val, its cost the sum of its members' searches.")
    if len({tuple(v) for v in fit_on.values()}) > 1:
        out.append("- **The arms' final models were fit on different data ("
                   + ", ".join(f"{kind_name(a)}: {' / '.join(v)}" for a, v in fit_on.items())
                   + "), so the comparison is not like for like.**")
    return out


def _searches(arm: str) -> str:
    return ("one per backbone and fused set: method, feature set and the method's settings (`[tune.head]`)"
            if arm == "head" else "one per backbone: policy, learning rate, trunk multiplier, weight decay, label "
            "smoothing and epochs (`[tune.finetune]`), pruned on val epoch by epoch")


def _trial_counts(part: list[ResultRow], trials: pd.DataFrame | None, *, arm: str, seed: int) -> str:
    if trials is None or trials.empty:
        return f"{sum(r.n_variants for r in part)} settings scored on val in all"
    mine = trials[(trials.arm == arm) & (trials.split_seed == seed)]
    counts = "/".join(str(n) for n in sorted(set(mine.groupby("backbone").size())))
    pruned = int((mine.state == "PRUNED").sum())
    return f"{counts} trials each ({pruned} pruned in all)"


def _variant_list(part: list[ResultRow]) -> str:
    """Each (method, feature set) once, with how many backbones (and fused sets) chose it, e.g. `lr (aug)` x4."""
    counts = Counter(f"`{r.method} ({r.feature_set})`" for r in part)
    return ", ".join(name + (f" x{n}" if n > 1 else "") for name, n in sorted(counts.items()))


def _views_text(r: ResultRow) -> str:
    name = f"`{r.method} ({r.feature_set})`" if r.kind == "finetune" else f"`{r.feature_set}`"
    if r.method == ENSEMBLE:
        return f"{name} its members' (it trains nothing itself)"
    if r.views_fresh:
        return f"{name} a fresh augmentation every step"
    if r.views is None:
        return f"{name} augmented views (count not recorded)"
    if r.views == 0:
        return f"{name} clean images only"
    reuse = ("cached once and reused every epoch (prefix cache)" if r.kind == "finetune"
             else "extracted once")
    return f"{name} clean + {r.views} fixed augmented views per image, {reuse}"


def _n_boot(rows: list[ResultRow]) -> str:
    values = sorted({r.metrics.n_boot for r in rows if r.kind != "fewshot" and r.metrics.n_boot is not None})
    return ", ".join(map(str, values)) or "?"


def section_comparison(inp: ReportInputs) -> list[str]:
    # Ordered by val (the score choices are made on), never by test.
    main = inp.tables.main.sort_values(["backbone", "kind", "split_seed", "val_mean_per_class", "row"],
                                       ascending=[True, True, True, False, True])
    chosen = set(inp.tables.chosen_per_seed["row"])
    body = [[str(r.row), r.backbone, r.method, r.feature_set, r.tta, str(r.split_seed), r.fit_on, str(r.n_variants),
             pct(r.val_mean_per_class), "**chosen**" if r.row in chosen else "",
             pct_ci(r.top1, r.top1_lo, r.top1_hi),
             pct_ci(r.mean_per_class, r.mean_per_class_strat_lo, r.mean_per_class_strat_hi),
             pct(r.macro_f1), seconds(r.train_s), seconds(r.feature_s), seconds(r.predict_s),
             count(r.trainable_params)]
            for r in main.itertuples()]
    header = ["row", "backbone", "method", "features / aug", "test-time aug", "seed", "fit on", "settings tried",
              "val mean per-class %", "chosen on val", "top-1 % [95% CI]", "mean per-class % [95% class-stratified]",
              "macro-F1 %",
              "train s", "feature extraction s", "inference s", "trainable params"]
    out = ["## Comparison", "",
           "`row` is the line of `results.jsonl` (0-based) that each figure comes from; rows are ordered by val "
           "score, and *chosen on val* marks each (backbone, arm, seed)'s val-best row. For heads, *train s* is the "
           "hyperparameter sweep + refit and *feature extraction s* the one-off cost of the cached features they "
           "share (all splits and views); for fine-tuning, *train s* already includes building its frozen-prefix "
           "cache (or, for `ft:head`, the feature cache it reuses). *Test-time aug* `hflip`: heads score the mean "
           "embedding of each image and its mirror, fine-tuned models the mean of their two logits. *top-1 [95% CI]*: "
           "the row's own bootstrap over test images; *mean per-class [95% class-stratified]*: the report's bootstrap "
           "that resamples test images within each class, so no class drops out of a resample.", ""]
    out += md_table(header, body)
    return out + figure_links(inp.figures, accuracy_by_method="Accuracy by method",
                              accuracy_vs_cost="Accuracy against cost")


def section_augmentation(inp: ReportInputs) -> list[str]:
    """Each feature set against ``clean`` per (backbone, head), on val (what chose) and test, mean over seeds."""
    others = inp.tables.feature_sets
    body = []
    for (backbone, method), part in inp.tables.feature_set_effects.groupby(["backbone", "method"]):
        by_set = {r.feature_set: r for r in part.itertuples()}
        clean = by_set["clean"]
        cells = [backbone, method, str(clean.n_seeds), f"{pct(clean.val)} / {pct(clean.test)}"]
        cells += [f"{pts(by_set[f].val)} / {pts(by_set[f].test)}" if f in by_set else "–" for f in others]
        body.append(cells + [", ".join(map(str, sorted(i for r in by_set.values() for i in r.rows)))])
    out = ["### Effect of the feature sets on the heads", ""]
    if not body:
        return out + ["No head was trained on clean and on another feature set in this run.", ""]
    header = ["backbone", "head", "seeds", "clean: val % / test %"]
    header += [f"{FEATURE_SET_NAMES[f]}: Δ val / Δ test pts" for f in others] + ["rows"]
    out += md_table(header, body)
    return out + ["Means over the split seeds; each feature set is one more variant the val choice may take, "
                  "so the val column is the one that decides.", ""]


# The caption of the per-variant few-shot table (tests find the table by it).
FEWSHOT_DETAIL = ("Per arm, backbone and k (each draw a search of its own: the methods its draws chose; mean and sd "
                  "over the distinct draws of every split seed):")


def section_fewshot(inp: ReportInputs) -> list[str]:
    t = inp.tables
    out = ["### Few-shot curves", ""]
    if t.fewshot.empty:
        return out + ["No few-shot results in this run.", ""]
    out += fewshot_pair_lines(t)
    body = [[kind_name(r.arm), r.backbone, r.method, r.feature_set, str(r.k_per_class),
             str(r.n_distinct) + ("" if r.n_distinct == r.n_draws else f" ({r.n_draws} identical draws)"),
             pct(r["mean"]), pct(r.sd), r.rows] for _, r in t.fewshot.iterrows()]
    out += [FEWSHOT_DETAIL, ""]
    out += md_table(["arm", "backbone", "method", "features / aug", "k per class", "distinct draws",
                     "mean per-class % (mean)", "sd", "rows"], body)
    out += ["Draws that took the whole train set (every draw seed the same images) are one fit, counted once.", ""]
    return out + figure_links(inp.figures, fewshot="Few-shot: fine-tune minus head, per backbone")


def fewshot_pair_lines(t: Tables) -> list[str]:
    """Per backbone: the fine-tune minus the head at each k on the same drawn images, with its interval, and where
    (if anywhere) one arm is ahead beyond it."""
    if t.fewshot_pairs.empty:
        return ["No backbone has both arms' few-shot fits on the same drawn images, so the arms are not compared "
                "point by point (the per-variant table below shows each arm alone).", ""]
    out = []
    for backbone, part in t.fewshot_pairs.groupby("backbone", sort=True):
        body = [[str(r.k_per_class), str(r.pairs), pct(r["head"]), pct(r["finetune"]), pts_ci(r["diff"], r.lo, r.hi),
                 p_text(r.p), r.rows] for _, r in part.sort_values("k_per_class").iterrows()]
        out += [f"**{backbone}**, both arms on the same drawn images:", ""]
        out += md_table(["k per class", "draws (pairs)", "head % (mean)", "fine-tune % (mean)",
                         "fine-tune − head (pts) [95% interval]", "p (bootstrap)", "rows (head/fine-tune)"], body)
        out += [crossover_text(part, t.crossovers.get(backbone)), ""]
    return out + [FEWSHOT_NOTE, ""]


FEWSHOT_NOTE = (
    "A pair is one draw of k training images per class fitted by both arms (same backbone, split seed and draw "
    "seed); pairs repeated exactly (k = the whole pool) count once. The interval resamples the pairs (what other "
    "draws would have given) and, within class, the test images; a crossover is declared only where it excludes 0. "
    "These intervals are per k, not adjusted for the several k (the Holm family is the comparisons above).")


def crossover_text(part: pd.DataFrame, k0: int | None) -> str:
    head_ahead = [int(r.k_per_class) for r in part.itertuples() if r.hi < 0]
    text = (f"Fine-tuning is ahead beyond its interval from k = {k0}." if k0 is not None else
            "At no k is the fine-tune ahead beyond its interval: no crossover.")
    if head_ahead:
        text += f" The head is ahead beyond its interval at k = {', '.join(map(str, head_ahead))}."
    return text


def section_errors(inp: ReportInputs) -> list[str]:
    chosen = inp.tables.chosen
    out = ["### Where the chosen model fails", ""]
    if chosen is None:
        return out + ["No result.", ""]
    row, other = chosen.row, chosen.other
    out.append(f"The decision's model: `{row.backbone}` `{row.method} ({row.feature_set})`, split seed "
               f"{row.split_seed}, row {row.index}" + ("" if other is None else
                                                        f"; beside it the other arm's choice on the same test images, "
                                                        f"`{other.backbone}` `{other.method} ({other.feature_set})` "
                                                        f"(row {other.index})") + ".")
    out += ["", "Worst classes (test images right of the class's test images):", ""]
    models = [row] + ([] if other is None else [other])
    body = [[r.class_name] + [_class_cell(m, r.label) for m in models]
            for r in chosen.per_class.head(inp.worst_n).itertuples()]
    out += md_table(["class", "chosen: right / images (%)", "other arm: right / images (%)"][:len(models) + 1], body)
    out += ["Most-confused pairs (true → predicted, test images):", ""]
    out += md_table(["true", "predicted", "images", "of the class's test images"],
                    [[r.true, r.predicted, str(r.images), str(r.class_images)]
                     for r in chosen.confused.head(inp.worst_n).itertuples()])
    return out + figure_links(inp.figures, confusion="Confusions among the worst classes, both arms",
                              per_class="Worst classes, both arms")


def _class_cell(row: ResultRow, label: int) -> str:
    cm = row.metrics.confusion
    right, total = int(cm[label][label]), int(sum(cm[label]))
    return f"{right} / {total} ({pct(right / total) if total else '–'})"


def section_published(_: ReportInputs) -> list[str]:
    out = ["## Published figures, for context", "",
           "Different splits, class sets (this study's merged dataset is not Caltech 101 alone), image sizes and "
           "training budgets: context, not a leaderboard.", ""]
    return out + md_table(["method", "Caltech 101 %", "protocol", "source"],
                          [[m, f"{v:.1f}", p, s] for m, v, p, s in PUBLISHED])


def section_skipped(inp: ReportInputs) -> list[str]:
    if not inp.skips:
        return []
    out = ["## Skipped", ""]
    return out + md_table(["stage", "what", "reason", "fix"],
                          [[s["stage"], s["what"], s["reason"], s.get("fix", "")] for s in inp.skips])


def section_provenance(inp: ReportInputs) -> list[str]:
    return provenance_lines(inp.provenance)


def provenance_lines(p: dict) -> list[str]:
    """The report's last section, from provenance.json (``reports.stage.record_end`` rewrites it alone)."""
    git = p.get("git", {})
    pkgs = ", ".join(f"{k} {v}" for k, v in (p.get("packages") or {}).items() if v)
    return [
        "## Provenance", "",
        f"- git `{git.get('sha')}`{' (dirty working tree)' if git.get('dirty') else ''}",
        f"- command: `{' '.join(p.get('argv', []))}`",
        f"- device: {p.get('device')}; platform: {p.get('platform')}; Python {p.get('python')}",
        f"- packages: {pkgs}",
        f"- started {p.get('started')}, " + _ended(p),
        *machine_lines(p),
        "- the full resolved config is `config.resolved.toml` beside this report; every result is a line of "
        "`results.jsonl` (also flattened into `results.csv`, `summary.csv` and `per_class.csv`).",
        "",
    ]


def machine_lines(p: dict) -> list[str]:
    """What the run asked of the machine and how busy it was, where provenance.json records it (at the run's end)."""
    out = []
    if p.get("wall_s") is not None:
        out.append(f"- wall time {p['wall_s']:.0f} s" + ("; per stage: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in p["stage_seconds"].items()) if p.get("stage_seconds") else ""))
    if p.get("peak_rss_bytes") is not None:
        out.append(f"- peak resident memory {p['peak_rss_bytes'] / 2 ** 30:.2f} GiB (the process and its workers, "
                   "shared pages counted once)"
                   + ("" if p.get("peak_rss_sampled", True) else " (this process only)"))
    load = p.get("load_avg") or {}
    if load:
        out.append(f"- 1-minute load average: {load.get('start', '?')} at the start, {load.get('end', '?')} at the end "
                   "(above the CPU count, other work shared the CPUs and every timing is slower for it)")
    return out


def _ended(p: dict) -> str:
    # The report is the run's last stage, so it is written before the run ends; run_study records the
    # end in provenance.json and then rewrites this section (reports.stage.record_end).
    if p.get("ended"):
        return f"ended {p['ended']} (status {p.get('status', '?')})"
    return "report written before the run ended (the end time and status are in provenance.json)"


def section_training(inp: ReportInputs) -> list[str]:
    if "training_curves" not in inp.figures:
        return []
    return ["### Training curves", "",
            "One row of panels per policy: per epoch, each fine-tune's mean training loss and its val mean "
            "per-class accuracy (one line per backbone and split seed, coloured by backbone; thick: the fine-tune "
            "arm's choice); the ringed epoch is the one kept (best val).", "",
            f"![Training curves]({inp.figures['training_curves']})", ""]


SECTIONS = (section_card, section_dataset, section_protocol, section_comparison, section_answer, section_budget,
            section_seeds, section_per_source, section_augmentation, section_fewshot, section_training, section_errors,
            section_limitations, section_published, section_skipped, section_provenance)


def render(inp: ReportInputs, *, title: str) -> str:
    lines = [f"# {title}", ""]
    for section in SECTIONS:
        lines += section(inp)
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def read_run_inputs(run_dir: Path) -> tuple[dict, dict]:
    prov_path = run_dir / "provenance.json"
    provenance = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    cfg_path = run_dir / "config.resolved.toml"
    config = tomllib.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return provenance, config
