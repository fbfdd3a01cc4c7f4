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

from reports.collect import ENSEMBLE, FEATURE_SET_NAMES, FUSED_PREFIX, BackboneVerdict
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


def pct(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{100 * x:.1f}"


def pct_ci(value, lo, hi) -> str:
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return pct(value)
    return f"{pct(value)} [{pct(lo)}, {pct(hi)}]"


def seconds(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{x:.1f}"


def count(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{int(x):,}"


def md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return lines + [""]


def mean_sd(mean, sd, n: int) -> str:
    return pct(mean) if n < 2 else f"{pct(mean)} ± {pct(sd)}"


def figure_links(figures: dict[str, str], **captions: str) -> list[str]:
    """An image link per figure named in ``captions`` (figure key -> caption) that the run drew, in that order."""
    return [line for key, caption in captions.items() if key in figures
            for line in (f"![{caption}]({figures[key]})", "")]


def section_headline(inp: ReportInputs) -> list[str]:
    headline = inp.tables.headline
    if headline is None:
        return ["No head or fine-tuning result in this run.", ""]
    best, first, other = headline.best, headline.first, headline.other
    n_variants = len(inp.tables.variants)
    n = int(best.n_seeds)
    test = (f"{pct_ci(first.mean_per_class, first.mean_per_class_lo, first.mean_per_class_hi)}% test mean "
            "per-class accuracy (95% CI)" if n == 1 else
            f"{mean_sd(best['mean'], best.sd, n)}% test mean per-class accuracy (mean ± sd over {n} split seeds)")
    runner = "" if other is None else (
        f" The other arm's val-best variant is `{other.backbone}` with `{other.method} ({other.feature_set})`: "
        f"{pct(other.val_mean)}% val, {mean_sd(other['mean'], other.sd, int(other.n_seeds))}% test"
        + (" — level with the chosen one on val at this precision, so val does not separate the two arms here"
           if pct(other.val_mean) == pct(best.val_mean) else "") + ".")
    return [f"**Chosen on val:** `{best.backbone}` with `{best.method} ({best.feature_set})` — "
            f"{pct(best.val_mean)}% val mean per-class accuracy, the best val score of the run's {n_variants} "
            f"head and fine-tune variants; {test}, {seconds(_cost(first))} s to train including its features "
            f"(split seed {int(first.split_seed)}; rows {best.rows}).{runner} Every \"chosen\" in this report is "
            "picked by "
            "val mean per-class accuracy; test takes no part in any choice and is shown for every row. Per-backbone "
            "verdicts are under Findings.", ""]


def section_answer(inp: ReportInputs) -> list[str]:
    t = inp.tables
    out = ["## Findings", "", "### Chosen head vs chosen fine-tune, per backbone", "",
           "Per split seed, each arm's variant with the best val mean per-class accuracy; McNemar's exact test on "
           "their paired top-1 test correctness. Over seeds: the mean and sd of the paired difference (head minus "
           "fine-tune, test mean per-class accuracy) and the seeds each arm wins.", ""]
    for v in t.verdicts:
        out += verdict_lines(v)
    paired = {v.backbone for v in t.verdicts}
    for backbone, part in t.chosen_per_seed.groupby("backbone"):
        if backbone not in paired:
            r = part.iloc[0]
            out.append(f"- **{backbone}**: only {_kind_name(r.arm)} results: chosen on val `{r.method} "
                       f"({r.feature_set})`, test {pct(r.mean_per_class)}.")
    if t.main.empty:
        out.append("No head or fine-tuning result in this run.")
    return out + [""]


def verdict_lines(v: BackboneVerdict) -> list[str]:
    """One backbone's verdict: over its seeds (with McNemar when there is one seed), then a line per seed."""
    body = [[str(s.seed), f"`{s.head.method} ({s.head.feature_set})` (row {int(s.head.row)})",
             pct(s.head.val_mean_per_class), pct(s.head.mean_per_class),
             f"`{s.finetune.method} ({s.finetune.feature_set})` (row {int(s.finetune.row)})",
             pct(s.finetune.val_mean_per_class), pct(s.finetune.mean_per_class), f"{100 * s.diff:+.1f}",
             f"{s.test.p_value:.3g}", str(s.test.only_a), str(s.test.only_b)] for s in v.seeds]
    wins = v.wins
    sd = "" if v.sd_diff is None else f" ± {100 * v.sd_diff:.1f} (sd)"
    s0 = v.seeds[0]
    significance = ("" if len(v.seeds) > 1 else
                    f"; {'significant' if s0.test.p_value < 0.05 else 'not significant'} at 5% (McNemar "
                    f"p = {s0.test.p_value:.3g}: of {s0.test.n_common} test images {s0.test.only_a} only the head "
                    f"got right, {s0.test.only_b} only the fine-tune)")
    out = [f"- **{v.backbone}**: head minus fine-tune {100 * v.mean_diff:+.1f} pts{sd} over {len(v.seeds)} "
           f"split seed{'s' if len(v.seeds) > 1 else ''}; wins: head {wins['head']}, fine-tune "
           f"{wins['finetune']}, ties {wins['tie']}{significance}; training cost incl. features (seed "
           f"{s0.seed}) {seconds(_cost(s0.head))} s vs {seconds(_cost(s0.finetune))} s.", ""]
    return out + md_table(["seed", "chosen head", "val %", "test %", "chosen fine-tune", "val %", "test %",
                           "Δ pts", "McNemar p", "only head right", "only fine-tune right"], body)


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
    body = [[r.backbone, _kind_name(r.arm), r.trials, str(r.pruned), seconds(r.seconds_per_seed), pct(r.best_val),
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
    out = ["### Every variant: mean ± sd over split seeds", ""]
    if v.empty:
        return out + ["No head or fine-tuning result in this run.", ""]
    body = [[r.backbone, _kind_name(r.arm), r.method, r.feature_set, str(int(r.n_seeds)), pct(r.val_mean),
             mean_sd(r["mean"], r.sd, int(r.n_seeds)), "**chosen**" if r.chosen else "", r.rows]
            for _, r in v.iterrows()]
    out += md_table(["backbone", "arm", "method", "features / aug", "seeds", "val mean per-class % (mean)",
                     "test mean per-class % (mean ± sd)", "chosen on val", "rows"], body)
    for t in inp.tables.val_ties.itertuples():
        out.append(f"- **Val tie** ({t.backbone}, {_kind_name(t.arm)}): {t.n_tied} variants share the best val score "
                   f"{pct(t.val_mean)}%; `{t.method} ({t.feature_set})` was chosen by the lower val log-loss (then "
                   "row order). The val split cannot rank these variants; their test figures are shown above.")
    return out + ["", "`summary.csv` holds this table; `results.csv` each seed's row with its 95% interval.", ""]


def _kind_name(kind: str) -> str:
    return {"head": "frozen features + head", "finetune": "fine-tune"}[kind]


def _cost(r) -> float:
    return r.train_s + (0 if r.feature_s is None or pd.isna(r.feature_s) else r.feature_s)


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
                                                        if kinds else "") + "; one copy kept, so no image or near-copy is in two splits.")
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
           f"validation; the rest of each class is test)." if split.get("protocol") == "per_class" else "."),
        "- Every choice — a tuner trial of either arm, a fine-tune's epoch, each arm's chosen variant and the "
        "headline — is made by mean per-class accuracy on `val` (within a search an exact tie goes to the cheaper "
        "trial); `test` scores each final model once and takes part in no choice.",
    ]
    out += protocol_arm_lines(inp.tables.rows, inp.tables.trials)
    out += [
        f"- Test-time augmentation: heads `{tta['extract']}`, fine-tuning `{tta['finetune']}` (`hflip`: each "
        "val/test image is also seen mirrored; heads average the two embeddings, fine-tuned models their two "
        "logits)." + ("" if tta["extract"] == tta["finetune"] else " **The two arms differ here, so the comparison "
                      "is not like for like.**"),
        "- Metrics on test: top-1; top-5; **mean per-class accuracy** (the mean of per-class recalls, Caltech's "
        "headline metric); macro-F1. 95% intervals are percentile bootstrap over test samples "
        f"({_n_boot(inp.tables.rows)} resamples); they cover test sampling only — the spread over split seeds is the "
        "sd in the over-seeds table.",
        "- Cost: training wall seconds (heads: hyperparameter sweep + refit on cached features; fine-tuning: "
        "all epochs incl. prefix-cache build) and inference wall seconds on the test set, on the run's device "
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
        out.append(f"- **{_kind_name(arm)}**: {len(searched)} tuner search(es) per split seed ({_searches(arm)}), "
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
                   + ", ".join(f"{_kind_name(a)}: {' / '.join(v)}" for a, v in fit_on.items())
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
             pct_ci(r.top1, r.top1_lo, r.top1_hi), pct_ci(r.mean_per_class, r.mean_per_class_lo, r.mean_per_class_hi),
             pct(r.macro_f1), seconds(r.train_s), seconds(r.feature_s), seconds(r.predict_s),
             count(r.trainable_params)]
            for r in main.itertuples()]
    header = ["row", "backbone", "method", "features / aug", "test-time aug", "seed", "fit on", "settings tried",
              "val mean per-class %", "chosen on val", "top-1 % [95% CI]", "mean per-class % [95% CI]", "macro-F1 %",
              "train s", "feature extraction s", "inference s", "trainable params"]
    out = ["## Comparison", "",
           "`row` is the line of `results.jsonl` (0-based) that each figure comes from; rows are ordered by val "
           "score, and *chosen on val* marks each (backbone, arm, seed)'s val-best row. For heads, *train s* is the "
           "hyperparameter sweep + refit and *feature extraction s* the one-off cost of the cached features they "
           "share (all splits and views); for fine-tuning, *train s* already includes building its frozen-prefix "
           "cache (or, for `ft:head`, the feature cache it reuses). *Test-time aug* `hflip`: heads score the mean "
           "embedding of each image and its mirror, fine-tuned models the mean of their two logits.", ""]
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
        cells += [f"{_points(by_set[f].val)} / {_points(by_set[f].test)}" if f in by_set else "–" for f in others]
        body.append(cells + [", ".join(map(str, sorted(i for r in by_set.values() for i in r.rows)))])
    out = ["### Effect of the feature sets on the heads", ""]
    if not body:
        return out + ["No head was trained on clean and on another feature set in this run.", ""]
    header = ["backbone", "head", "seeds", "clean: val % / test %"]
    header += [f"{FEATURE_SET_NAMES[f]}: Δ val / Δ test pts" for f in others] + ["rows"]
    out += md_table(header, body)
    return out + ["Means over the split seeds; each feature set is one more variant the val choice may take, "
                  "so the val column is the one that decides.", ""]


def _points(diff) -> str:
    """A difference of two fractions in percentage points, signed, or a dash where there is none."""
    return "–" if diff is None or pd.isna(diff) else f"{100 * diff:+.1f}"


# The caption of the per-variant few-shot table (tests find the table by it).
FEWSHOT_DETAIL = ("Per variant and k (each split seed's chosen variant; mean and sd over its distinct fits, pooled "
                  "over the split seeds that chose it):")


def section_fewshot(inp: ReportInputs) -> list[str]:
    t = inp.tables
    out = ["### Few-shot curves", ""]
    if t.fewshot.empty:
        return out + ["No few-shot results in this run.", ""]
    if set(t.fewshot_arms.arm) >= {"head", "finetune"}:
        out += fewshot_arm_lines(t)
    body = [[_kind_name(r.arm), r.backbone, r.method, r.feature_set, str(r.k_per_class),
             str(r.n_distinct) + ("" if r.n_distinct == r.n_draws else f" ({r.n_draws} identical draws)"),
             pct(r["mean"]), pct(r.sd), r.rows] for _, r in t.fewshot.iterrows()]
    out += [FEWSHOT_DETAIL, ""]
    out += md_table(["arm", "backbone", "method", "features / aug", "k per class", "distinct draws",
                     "mean per-class % (mean)", "sd", "rows"], body)
    out += ["Draws with identical test predictions (every seed took the whole pool) are one fit, counted once.", ""]
    return out + figure_links(inp.figures, fewshot="Few-shot curves")


def fewshot_arm_lines(t: Tables) -> list[str]:
    """The arms' few-shot curves side by side (``Tables.fewshot_arms``) and where, if anywhere, the fine-tune
    overtakes the head: on the draws both arms fitted (``Tables.paired_gaps``) where there are any."""
    by = {arm: {int(r.k_per_class): r for _, r in part.iterrows()} for arm, part in t.fewshot_arms.groupby("arm")}
    head, ft = by.get("head", {}), by.get("finetune", {})
    gaps, paired = t.fewshot_gaps, t.paired_gaps

    def cell(r) -> str:
        return "–" if r is None else f"{mean_sd(r['mean'], r.sd, int(r.n))} (n = {int(r.n)})"

    body = []
    for k in sorted(set(head) | set(ft)):
        present = [(a, r) for a, r in (("head", head.get(k)), ("finetune", ft.get(k))) if r is not None]
        compared = (f"{paired[k][1]} paired" if k in paired else "pooled means") if k in gaps else "–"
        body.append([str(k), cell(head.get(k)), cell(ft.get(k)), f"{100 * gaps[k]:+.1f}" if k in gaps else "–",
                     compared, "; ".join(f"{_kind_name(a)}: {r.variants}" for a, r in present),
                     "; ".join(f"{_kind_name(a)}: {r.rows}" for a, r in present)])
    out = md_table(["k per class", "head arm: mean per-class % (mean ± sd, n)",
                    "fine-tune arm: mean per-class % (mean ± sd, n)", "fine-tune − head (pts)", "draws compared",
                    "variants", "rows"], body)
    return out + [f"{_crossover_verdict(gaps, t.crossover)} {FEWSHOT_ARMS_NOTE}{_uneven(t.fewshot_arms)}", ""]


# How the arms' curves were made and compared, after the verdict.
FEWSHOT_ARMS_NOTE = (
    "Each split seed's curve is that seed's val-chosen variant of each arm (the chosen head over every backbone, "
    "fused set and feature set; the chosen fine-tune over every single backbone and policy: an ensemble of "
    "fine-tunes draws no curve, which would retrain every member at every k), refit with its chosen settings, so "
    "the variants above can differ between seeds. The fine-tune's draws are the head arm's first ones (same draw "
    "seeds, so the same images; the head arm may take more draws, as it is cheap), and the fine-tune keeps the "
    "chosen refit's optimizer-step count (its epochs scaled by the ratio of steps per epoch). Where k takes every "
    "train+val image, the point is the chosen model itself. n counts distinct fits (split seeds x draws; "
    "identical fits once); the gap and the verdict compare the two arms on the draws both fitted (same split seed "
    "and draw seed: the same images; 'paired'), and fall back to the arms' pooled means where they share none. "
    "There is no test of significance: read a gap within the sd as a tie.")


def _crossover_verdict(gaps: dict[int, float], k0: int | None) -> str:
    if k0 is not None:
        behind = [k for k, g in gaps.items() if k > k0 and g <= 0]
        return (f"Fine-tuning overtakes the frozen-feature head from k = {k0} images per class"
                + (f" (but not at every larger k: it is not ahead at k = {', '.join(map(str, behind))})"
                   if behind else "") + ".")
    if gaps:
        k_max = min(gaps, key=lambda k: gaps[k])  # the head's largest lead
        return (f"At no k measured does the fine-tune arm's mean exceed the head arm's (largest gap "
                f"{-100 * gaps[k_max]:.1f} pts in the head's favour, at k = {k_max}).")
    return "The two arms measured no k in common, so their curves cannot be compared point by point."


def _uneven(arms: pd.DataFrame) -> str:
    """A warning when the head arm's curve is a fused set's and the fine-tune arm's a single network's."""
    fused = {arm: any(v.startswith(FUSED_PREFIX) for vs in part["variants"] for v in vs.split("; "))
             for arm, part in arms.groupby("arm")}
    if fused.get("head") and not fused.get("finetune", True):
        return (" Here the head arm's curve is a fused set's (several backbones' features) and the fine-tune "
                "arm's a single network's: the curves compare what each arm's val choice yields, not one backbone "
                "against itself.")
    return ""


def section_errors(inp: ReportInputs) -> list[str]:
    chosen = inp.tables.chosen
    out = ["### Where the chosen model fails", ""]
    if chosen is None:
        return out + ["No result.", ""]
    row = chosen.row
    out.append(f"The model chosen on val: `{row.backbone}` `{row.method} ({row.feature_set})`, split seed "
               f"{row.split_seed}, "
               f"row {row.index}.")
    out.append("")
    out += ["Worst classes:", ""]
    out += md_table(["class", "test accuracy %"],
                    [[r.class_name, pct(r.accuracy)] for r in chosen.per_class.head(inp.worst_n).itertuples()])
    out += ["Most-confused pairs (true → predicted, test images):", ""]
    out += md_table(["true", "predicted", "images", "of the class's test images"],
                    [[r.true, r.predicted, str(r.images), str(r.class_images)]
                     for r in chosen.confused.head(inp.worst_n).itertuples()])
    return out + figure_links(inp.figures, confusion="Confusion matrix of the chosen model",
                              per_class="Per-class accuracy of the chosen model")


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
        "- the full resolved config is `config.resolved.toml` beside this report; every result is a line of "
        "`results.jsonl` (also flattened into `results.csv`, `summary.csv` and `per_class.csv`).",
        "",
    ]


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
            "Per epoch, every fine-tune's mean training loss and its val mean per-class accuracy; the marked "
            "epoch is the one kept (best val).", "", f"![Training curves]({inp.figures['training_curves']})", ""]


SECTIONS = (section_dataset, section_protocol, section_comparison, section_answer, section_budget, section_seeds,
            section_augmentation, section_fewshot, section_training, section_errors, section_published,
            section_skipped, section_provenance)


def render(inp: ReportInputs, *, title: str) -> str:
    lines = [f"# {title}", ""] + section_headline(inp)
    for section in SECTIONS:
        lines += section(inp)
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def read_run_inputs(run_dir: Path) -> tuple[dict, dict]:
    provenance = json.loads((run_dir / "provenance.json").read_text()) if (run_dir / "provenance.json").is_file() else {}
    cfg_path = run_dir / "config.resolved.toml"
    config = tomllib.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return provenance, config
