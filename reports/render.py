"""Render ``report.md`` from a run folder: one function per section, each returning markdown lines.

Inputs: ``results.jsonl`` (every metric), ``skipped.jsonl``, ``provenance.json``,
``config.resolved.toml`` and the dataset stage's ``summary.json`` + manifest (class names, test
labels for McNemar). Every number in a table is formatted from a results row whose index is in
the table's ``row`` column.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from reports.stats import mcnemar

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


@dataclass
class ReportInputs:
    rows: list[dict]
    results: pd.DataFrame       # reports.collect.results_table
    per_class: pd.DataFrame     # reports.collect.per_class_table
    summary: dict | None        # dataset summary.json
    labels_by_id: dict[str, int]
    skips: list[dict]
    provenance: dict
    config: dict
    figures: dict[str, str]     # figure name -> file name in the run folder
    worst_n: int = 10


def pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


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


def main_results(results: pd.DataFrame) -> pd.DataFrame:
    return results[results.kind.isin(["head", "finetune"])]


def best_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Per backbone: the best head and the best fine-tune by test mean per-class accuracy."""
    main = main_results(results)
    idx = main.groupby(["backbone", "kind"])["mean_per_class"].idxmax()
    return main.loc[idx.values]


def section_headline(inp: ReportInputs) -> list[str]:
    best = best_overall(inp.results)
    if best is None:
        return ["No head or fine-tuning result in this run.", ""]
    return [f"**Best overall:** `{best.backbone}` with `{best.method} ({best.feature_set})` — "
            f"{pct(best.mean_per_class)}% test mean per-class accuracy "
            f"(95% CI {pct(best.mean_per_class_lo)}–{pct(best.mean_per_class_hi)}), "
            f"{seconds(_cost(best))} s to train including its features (row {int(best.row)}). "
            "Per-backbone verdicts are under Findings.", ""]


def section_answer(inp: ReportInputs) -> list[str]:
    best = best_rows(inp.results)
    out = ["## Findings", "", "### Best method per backbone: frozen features + head, or fine-tuning?", ""]
    if best.empty:
        return out + ["No head or fine-tuning result in this run.", ""]
    for backbone, part in best.groupby("backbone"):
        by_kind = {r.kind: r for r in part.itertuples()}
        h, f = by_kind.get("head"), by_kind.get("finetune")
        if h is not None and f is not None:
            winner, loser = (h, f) if h.mean_per_class >= f.mean_per_class else (f, h)
            test = mcnemar(inp.rows[h.row], inp.rows[f.row], labels_by_id=inp.labels_by_id)
            verdict = (f"{'significant' if test.p_value < 0.05 else 'not significant'} at 5%: of "
                       f"{test.n_common} test images, {test.only_a} only the head got right, "
                       f"{test.only_b} only the fine-tune")
            out.append(
                f"- **{backbone}**: best {_kind_name(winner.kind)} `{winner.method} ({winner.feature_set})` "
                f"{pct(winner.mean_per_class)} vs best {_kind_name(loser.kind)} `{loser.method} ({loser.feature_set})` "
                f"{pct(loser.mean_per_class)} mean per-class accuracy "
                f"({100 * (winner.mean_per_class - loser.mean_per_class):+.1f} pts; McNemar test on paired top-1 "
                f"correctness p = {test.p_value:.3g}, "
                f"{verdict}); training cost incl. features {seconds(_cost(winner))} s vs {seconds(_cost(loser))} s."
            )
        else:
            only = h if h is not None else f
            out.append(f"- **{backbone}**: only {_kind_name(only.kind)} results: best `{only.method} "
                       f"({only.feature_set})` {pct(only.mean_per_class)}.")
    return out + [""]


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
    few = inp.results[inp.results.kind == "fewshot"] if not inp.results.empty else inp.results
    seeds = sorted(set(few["seed"].tolist())) if not few.empty else []
    res = inp.results
    # From the rows (what the numbers were computed with), not from the config.
    tta = {arm: ", ".join(sorted(set(res[res.kind.isin(kinds)]["tta"]))) if not res.empty else "–"
           for arm, kinds in (("extract", ["head", "fewshot"]), ("finetune", ["finetune"]))}
    return [
        "## Protocol", "",
        f"- Splits are made once by the dataset stage (seed {cfg.get('seed')}), stored in the manifest, and shared by "
        f"every head and fine-tune: protocol `{split.get('protocol', '?')}` "
        + (f"({split.get('train_per_class')} training images per class, of which {split.get('val_per_class')} are "
           f"validation; the rest of each class is test)." if split.get("protocol") == "per_class" else "."),
        "- Hyperparameters (head grids, normalisation, fine-tuning epochs by early stopping) are chosen on `val` only, "
        "by mean per-class accuracy; the chosen model is refit on train+val and scores `test` once.",
        f"- Test-time augmentation: heads `{tta['extract']}`, fine-tuning `{tta['finetune']}` (`hflip`: each "
        "val/test image is also seen mirrored; heads average the two embeddings, fine-tuned models their two "
        "logits)." + ("" if tta["extract"] == tta["finetune"] else " **The two arms differ here, so the comparison "
                      "is not like for like.**"),
        "- Metrics on test: top-1; top-5; **mean per-class accuracy** (the mean of per-class recalls, Caltech's "
        "headline metric); macro-F1. 95% intervals are percentile bootstrap over test samples "
        f"({_n_boot(inp.rows)} resamples).",
        "- Cost: training wall seconds (heads: hyperparameter sweep + refit on cached features; fine-tuning: "
        "all epochs incl. prefix-cache build) and inference wall seconds on the test set, on the run's device "
        f"(`{inp.provenance.get('device', '?')}`).",
        f"- Seed {cfg.get('seed')} for the split, the heads and fine-tuning; few-shot draws use seeds "
        f"{', '.join(map(str, seeds)) or '–'}.",
        "",
    ]


def _n_boot(rows: list[dict]) -> str:
    values = sorted({r["metrics"].get("n_boot") for r in rows
                     if r["kind"] != "fewshot" and r["metrics"].get("n_boot") is not None})
    return ", ".join(map(str, values)) or "?"


def section_comparison(inp: ReportInputs) -> list[str]:
    main = main_results(inp.results).sort_values(["backbone", "kind", "mean_per_class"], ascending=[True, True, False])
    body = [[str(r.row), r.backbone, r.method, r.feature_set, r.tta, str(r.seed),
             pct_ci(r.top1, r.top1_lo, r.top1_hi), pct_ci(r.mean_per_class, r.mean_per_class_lo, r.mean_per_class_hi),
             pct(r.macro_f1), seconds(r.train_s), seconds(r.feature_s), seconds(r.predict_s),
             count(r.trainable_params)]
            for r in main.itertuples()]
    header = ["row", "backbone", "method", "features / aug", "test-time aug", "seed", "top-1 % [95% CI]",
              "mean per-class % [95% CI]", "macro-F1 %", "train s", "feature extraction s", "inference s",
              "trainable params"]
    out = ["## Comparison", "",
           "`row` is the line of `results.jsonl` (0-based) that each figure comes from. For heads, *train s* is the "
           "hyperparameter sweep + refit and *feature extraction s* the one-off cost of the cached features they "
           "share (all splits and views); for fine-tuning, *train s* already includes building its frozen-prefix "
           "cache (or, for `ft:head`, the feature cache it reuses). *Test-time aug* `hflip`: heads score the mean "
           "embedding of each image and its mirror, fine-tuned models the mean of their two logits.", ""]
    out += md_table(header, body)
    for key, caption in (("accuracy_by_method", "Accuracy by method"), ("accuracy_vs_cost", "Accuracy against cost")):
        if key in inp.figures:
            out += [f"![{caption}]({inp.figures[key]})", ""]
    return out


def section_augmentation(inp: ReportInputs) -> list[str]:
    heads = inp.results[inp.results.kind == "head"]
    body = []
    for (backbone, method, seed), part in heads.groupby(["backbone", "method", "seed"]):
        sets = {r.feature_set: r for r in part.itertuples()}
        if "clean" in sets and "aug" in sets:
            c, a = sets["clean"], sets["aug"]
            body.append([backbone, method, str(seed), f"{pct(c.mean_per_class)} (row {c.row})",
                         f"{pct(a.mean_per_class)} (row {a.row})",
                         f"{100 * (a.mean_per_class - c.mean_per_class):+.1f}"])
    out = ["### Effect of augmented views on the heads", ""]
    if not body:
        return out + ["No head was trained on both clean and augmented features in this run.", ""]
    return out + md_table(["backbone", "head", "seed", "clean %", "+ augmented views %", "Δ pts"], body)


def section_fewshot(inp: ReportInputs) -> list[str]:
    few = inp.results[inp.results.kind == "fewshot"]
    out = ["### Few-shot curves", ""]
    if few.empty:
        return out + ["No few-shot results in this run.", ""]
    body = []
    for (backbone, method, fset, k), part in few.groupby(["backbone", "method", "feature_set", "k_per_class"]):
        values = part["mean_per_class"]
        body.append([backbone, method, fset, str(int(k)), str(len(part)), pct(values.mean()),
                     pct(values.std()) if len(part) > 1 else "–", ", ".join(map(str, part["row"]))])
    out += md_table(["backbone", "head", "features", "k per class", "seeds", "mean per-class % (mean)",
                     "sd", "rows"], body)
    if "fewshot" in inp.figures:
        out += [f"![Few-shot curves]({inp.figures['fewshot']})", ""]
    return out


def best_overall(results: pd.DataFrame) -> pd.Series | None:
    main = main_results(results)
    return None if main.empty else main.loc[main["mean_per_class"].idxmax()]


def section_errors(inp: ReportInputs) -> list[str]:
    best = best_overall(inp.results)
    out = ["### Where the best model fails", ""]
    if best is None:
        return out + ["No result.", ""]
    row = inp.rows[int(best.row)]
    names = row.get("class_names") or [str(i) for i in range(len(row["metrics"]["confusion"]))]
    out.append(f"Best model: `{best.backbone}` `{best.method} ({best.feature_set})`, row {int(best.row)}.")
    out.append("")
    per = inp.per_class[(inp.per_class.row == best.row)].dropna(subset=["accuracy"]).sort_values("accuracy")
    out += ["Worst classes:", ""]
    out += md_table(["class", "test accuracy %"],
                    [[r.class_name, pct(r.accuracy)] for r in per.head(inp.worst_n).itertuples()])
    cm = np.asarray(row["metrics"]["confusion"])
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = [(int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off))]
    pairs.sort(reverse=True)
    out += ["Most-confused pairs (true → predicted, test images):", ""]
    out += md_table(["true", "predicted", "images", "of the class's test images"],
                    [[names[i], names[j], str(n), str(int(cm[i].sum()))] for n, i, j in pairs[: inp.worst_n]])
    for key, caption in (("confusion", "Confusion matrix of the best model"),
                         ("per_class", "Per-class accuracy of the best model")):
        if key in inp.figures:
            out += [f"![{caption}]({inp.figures[key]})", ""]
    return out


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
    p = inp.provenance
    git = p.get("git", {})
    pkgs = ", ".join(f"{k} {v}" for k, v in (p.get("packages") or {}).items() if v)
    return [
        "## Provenance", "",
        f"- git `{git.get('sha')}`{' (dirty working tree)' if git.get('dirty') else ''}",
        f"- command: `{' '.join(p.get('argv', []))}`",
        f"- device: {p.get('device')}; platform: {p.get('platform')}; Python {p.get('python')}",
        f"- packages: {pkgs}",
        f"- started {p.get('started')}, ended {p.get('ended') or '(running)'}",
        "- the full resolved config is `config.resolved.toml` beside this report; every result is a line of "
        "`results.jsonl` (also flattened into `results.csv` and `per_class.csv`).",
        "",
    ]


SECTIONS = (section_dataset, section_protocol, section_comparison, section_answer, section_augmentation,
            section_fewshot, section_errors, section_published, section_skipped, section_provenance)


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
