"""Both arms' few-shot curves and the comparison figures of a large study, from hand-made rows.

The few-shot rows are built so that each rule shows in the numbers: a repeated fit of one split seed
counts once, the same predictions on another split seed's test set do not, the arms cross at one k
only, and a k measured by one arm alone cannot be where they cross. The figures are drawn from fifty
synthetic variants over three backbones and a fused set, the size of the default study.
"""
import itertools

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reports import plots
from reports.collect import crossover, fewshot_arms, paired_gaps, results_table, summary_table, val_best_per_arm
from reports.render import FEWSHOT_DETAIL, ReportInputs, section_fewshot
from reports.stage import build_report
from reports.tables import Tables
from study.results import ResultRow, append_rows
from tests.report_checks import pct, table_after

IDS = {0: ["a", "b", "c", "d"], 1: ["e", "f", "g", "h"]}  # each split seed's test set
_fresh = itertools.count()


def _row(*, kind="fewshot", arm="head", k=None, split_seed=0, draw=0, acc=0.5, pred=None, **kw) -> dict:
    """A minimal results row; distinct predictions unless ``pred`` is given."""
    head = {"backbone": "efficientnet_lite0", "method": "lr", "feature_set": "clean"}
    ft = {"backbone": "efficientnet_lite1", "method": "ft:last:1", "feature_set": "light"}
    row = {"kind": kind, **(head if arm == "head" else ft), "seed": draw if kind == "fewshot" else split_seed,
           "split_seed": split_seed, "k_per_class": k,
           "metrics": {"top1": acc, "mean_per_class": acc, "macro_f1": acc, "n_boot": 0},
           "test_sample_id": IDS[split_seed], "test_pred": pred if pred is not None else [next(_fresh), 0, 0, 0],
           "hyperparams": {}, "train_s": 1.0, "predict_s": 0.1, "cache_key": "k", "manifest_hash": "h",
           "n_train": 4 * (k or 6), "n_test": 4, "fit_on": "train+val", "selection": None,
           "val_mean_per_class": None}
    return {**row, **kw}


# (arm, k) -> [(split seed, draw, test mean per-class, predictions or None for a fresh fit)]
CURVES = {
    ("head", 1): [(0, 0, 0.50, None), (0, 1, 0.60, None), (1, 0, 0.70, None)],
    ("finetune", 1): [(0, 0, 0.30, None), (0, 1, 0.40, None), (1, 0, 0.35, None)],
    # Split seed 0 draws the whole pool twice (one fit); split seed 1 predicts the same labels on
    # *its* test images, a different fit.
    ("head", 5): [(0, 0, 0.80, [1, 2, 3, 0]), (0, 1, 0.80, [1, 2, 3, 0]), (1, 0, 0.80, [1, 2, 3, 0])],
    ("finetune", 5): [(0, 0, 0.84, None), (0, 1, 0.86, None), (1, 0, 0.88, None)],
    ("head", 10): [(0, 0, 0.90, None), (1, 0, 0.92, None)],
    ("finetune", 10): [(0, 0, 0.93, None), (1, 0, 0.95, None)],
    ("finetune", 20): [(0, 0, 0.99, None)],  # the head has no k = 20: no comparison there
}


def _fewshot_rows(curves: dict) -> list[dict]:
    out = []
    for (arm, k), draws in curves.items():
        for split_seed, draw, acc, pred in draws:
            variant = {"backbone": "efficientnet_lite2", "method": "svm", "feature_set": "aug"} \
                if arm == "head" and split_seed == 1 else {}  # split seed 1 chose another head
            out.append(_row(arm=arm, k=k, split_seed=split_seed, draw=draw, acc=acc, pred=pred, **variant))
    return out


def _typed(raw: list[dict]) -> tuple[list[ResultRow], pd.DataFrame]:
    rows = [ResultRow.from_dict(r, index=i) for i, r in enumerate(raw)]
    return rows, results_table(rows)


def _never(curves: dict) -> dict:
    """The same curves with the fine-tune 0.2 below the head wherever the head measured a k."""
    out = dict(curves)
    for k in (1, 5, 10):
        out[("finetune", k)] = [(s, d, a - 0.2, None) for s, d, a, _ in curves[("head", k)]]
    return out


def test_fewshot_rows_of_the_finetune_arm_belong_to_it():
    arm = {(kind, method): ResultRow.from_dict(_row(kind=kind, k=1, method=method), index=0).arm
           for kind, method in (("fewshot", "ft:last:1"), ("fewshot", "ft:probe+last:2"), ("fewshot", "lr"),
                                ("finetune", "ft:head"), ("head", "svm"))}
    assert arm == {("fewshot", "ft:last:1"): "finetune", ("fewshot", "ft:probe+last:2"): "finetune",
                   ("fewshot", "lr"): "head", ("finetune", "ft:head"): "finetune", ("head", "svm"): "head"}


def test_fewshot_arms_pool_distinct_fits_over_split_seeds_and_draws():
    rows, results = _typed(_fewshot_rows(CURVES))
    arms = fewshot_arms(results, rows).set_index(["arm", "k_per_class"])
    assert sorted(arms.index) == sorted(CURVES)
    head1 = arms.loc[("head", 1)]
    assert (head1.n, head1.n_rows) == (3, 3)
    assert head1["mean"] == pytest.approx(0.60) and head1.sd == pytest.approx(0.10)  # sd of .5, .6, .7 (ddof=1)
    # k = 5, head: three rows, two fits (seed 0's repeat counts once; seed 1's test ids differ).
    head5 = arms.loc[("head", 5)]
    assert (head5.n, head5.n_rows) == (2, 3) and head5["mean"] == pytest.approx(0.80) and head5.sd == 0
    ft5 = arms.loc[("finetune", 5)]
    assert ft5.n == 3 and ft5["mean"] == pytest.approx(0.86) and ft5.sd == pytest.approx(0.02)
    only = arms.loc[("finetune", 20)]
    assert only.n == 1 and (only.sd is None or pd.isna(only.sd))
    assert head1.variants == "efficientnet_lite0 lr (clean); efficientnet_lite2 svm (aug)"
    assert arms.loc[("finetune", 10)].variants == "efficientnet_lite1 ft:last:1 (light)"
    raw = _fewshot_rows(CURVES)
    assert [int(i) for i in head5.rows.split(",")] == [i for i, r in enumerate(raw)
                                                       if r["k_per_class"] == 5 and not r["method"].startswith("ft:")]


def test_crossover_is_the_first_k_both_arms_measured_where_finetune_is_ahead():
    rows, results = _typed(_fewshot_rows(CURVES))
    assert crossover(fewshot_arms(results, rows)) == 5
    rows, results = _typed(_fewshot_rows(_never(CURVES)))
    arms = fewshot_arms(results, rows)
    assert crossover(arms) is None  # ahead only at k = 20, which the head did not measure
    assert crossover(arms[arms.arm == "head"]) is None
    # Equal means are not "exceeds".
    tie = {key: v for key, v in CURVES.items() if key[1] in (1, 10)}
    tie[("finetune", 1)] = [(s, d, a, None) for s, d, a, _ in CURVES[("head", 1)]]
    rows, results = _typed(_fewshot_rows(tie))
    assert crossover(fewshot_arms(results, rows)) == 10


def _section(curves: dict, *, figures=None) -> str:
    rows, _ = _typed(_fewshot_rows(curves))
    inp = ReportInputs(tables=Tables.from_rows(rows, labels_by_id={}), summary=None, skips=[], provenance={},
                       config={}, figures=figures or {})
    return "\n".join(section_fewshot(inp))


def test_the_section_compares_the_arms_and_says_where_they_cross():
    md = _section(CURVES, figures={"fewshot": "fewshot.png"})
    table = {c["k per class"]: c for c in table_after(md, "### Few-shot curves")}
    assert list(table) == ["1", "5", "10", "20"]
    assert table["1"]["head arm: mean per-class % (mean ± sd, n)"] == "60.0 ± 10.0 (n = 3)"
    assert table["5"]["head arm: mean per-class % (mean ± sd, n)"] == "80.0 ± 0.0 (n = 2)"
    assert table["5"]["fine-tune arm: mean per-class % (mean ± sd, n)"] == "86.0 ± 2.0 (n = 3)"
    assert table["20"]["fine-tune arm: mean per-class % (mean ± sd, n)"] == "99.0 (n = 1)"
    assert [table[k]["fine-tune − head (pts)"] for k in table] == ["-25.0", "+6.0", "+3.0", "–"]
    assert "efficientnet_lite2 svm (aug)" in table["1"]["variants"] and "ft:last:1" in table["1"]["variants"]
    assert "Fine-tuning overtakes the frozen-feature head from k = 5 images per class." in md
    assert "val-chosen variant of each arm" in md and "same images" in md and "optimizer-step count" in md
    detail = table_after(md, FEWSHOT_DETAIL)
    assert {(c["arm"], c["k per class"]) for c in detail} >= {("fine-tune", "20"), ("frozen features + head", "1")}
    assert md.index("head arm: mean per-class") < md.index(FEWSHOT_DETAIL) < md.index("![Few-shot curves]")


def test_the_section_says_when_the_finetune_falls_back_after_overtaking():
    curves = dict(CURVES)
    curves[("finetune", 10)] = [(0, 0, 0.85, None), (1, 0, 0.87, None)]  # below the head's 0.91 at k = 10
    md = _section(curves)
    assert ("Fine-tuning overtakes the frozen-feature head from k = 5 images per class (but not at every larger k: "
            "it is not ahead at k = 10).") in md


def test_the_section_says_when_finetuning_never_overtakes():
    md = _section(_never(CURVES))
    assert "Fine-tuning overtakes" not in md
    # The head leads by 20 pts at every shared k; the largest lead is reported with its k.
    assert "At no k measured does the fine-tune arm's mean exceed the head arm's (largest gap 20.0 pts" in md
    assert [c["fine-tune − head (pts)"] for c in table_after(md, "### Few-shot curves")] == \
        ["-20.0", "-20.0", "-20.0", "–"]


def test_the_section_with_only_the_head_arm_keeps_the_per_variant_table():
    md = _section({key: v for key, v in CURVES.items() if key[0] == "head"})
    assert "head arm: mean per-class" not in md and "overtakes" not in md
    first = table_after(md, "### Few-shot curves")
    assert {c["k per class"] for c in first} == {"1", "5", "10"} and "distinct draws" in first[0]
    rows = {(c["backbone"], c["k per class"]): c for c in first}
    assert rows[("efficientnet_lite0", "5")]["distinct draws"] == "1 (2 identical draws)"
    assert rows[("efficientnet_lite0", "1")]["mean per-class % (mean)"] == pct(0.55)


def test_a_report_with_both_arms_curves_draws_them(tmp_path):
    run_dir = tmp_path / "run"
    append_rows(run_dir / "results.jsonl", _fewshot_rows(CURVES))
    build_report(run_dir=run_dir, dataset_dir=tmp_path / "no-dataset", title="Few-shot")
    md = (run_dir / "report.md").read_text()
    assert "from k = 5 images per class" in md and "![Few-shot curves](fewshot.png)" in md
    _assert_png(run_dir / "fewshot.png")


# ---------------------------------------------------------------------------------------------
# Figures of a large study.

BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
             "fused:efficientnet_lite0+efficientnet_lite2"]


def _many_variants(seed: int) -> pd.DataFrame:
    """50 variants x 2 split seeds: heads lr/svm/knn x clean/aug/stages on 4 backbones (36), fine-tune
    policies on the 3 single backbones (12) and 2 more with another augmentation. Costs cluster the way
    real ones do (heads seconds, fine-tunes thousands), so the Pareto front crowds the cheap end."""
    rng = np.random.default_rng(seed)
    variants = [("head", b, m, f) for b in BACKBONES for m in ("lr", "svm", "knn") for f in ("clean", "aug", "stages")]
    variants += [("finetune", b, f"ft:{p}", "light") for b in BACKBONES[:3]
                 for p in ("head", "last:1", "last:2", "probe+last:2")]
    variants += [("finetune", "efficientnet_lite2", f"ft:{p}", "strong") for p in ("last:1", "last:2")]
    assert len(variants) == 50
    raw = []
    for kind, backbone, method, fset in variants:
        base_acc, base_cost = rng.uniform(0.86, 0.95), (rng.uniform(2, 60) if kind == "head"
                                                        else rng.uniform(300, 5000))
        for split_seed in (0, 1):
            acc = float(np.clip(base_acc + rng.normal(0, 0.004), 0, 1))
            raw.append(_row(kind=kind, split_seed=split_seed, acc=acc, backbone=backbone, method=method,
                            feature_set=fset, train_s=float(base_cost * rng.uniform(0.95, 1.05)),
                            feature_s=30.0 if kind == "head" else None,
                            val_mean_per_class=float(np.clip(acc + rng.normal(0, 0.01), 0, 1)),
                            metrics={"top1": acc, "mean_per_class": acc, "macro_f1": acc, "n_boot": 100,
                                     "ci95": {"mean_per_class": [acc - 0.01, acc + 0.01]}}))
    return results_table([ResultRow.from_dict(r, index=i) for i, r in enumerate(raw)])


def _assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.width > 300 and img.height > 300
        return img.size


def test_comparison_figures_of_fifty_variants_are_valid_pngs(tmp_path):
    points = summary_table(_many_variants(0))
    _assert_png(plots.accuracy_vs_cost(points, val_best_per_arm(points), tmp_path / "cost.png"))
    _, height = _assert_png(plots.accuracy_by_method(points, tmp_path / "by_method.png"))
    _, few_height = _assert_png(plots.accuracy_by_method(points[points.backbone == BACKBONES[0]], tmp_path / "few.png"))
    assert height > 2 * few_height  # the bar chart grows with its 50 bars (one per variant, not per seed)


def test_backbones_get_fixed_distinct_markers_and_fused_sets_their_own():
    markers = plots.backbone_markers(reversed(BACKBONES))
    assert len(set(markers.values())) == len(BACKBONES)
    assert markers[BACKBONES[3]] in plots.FUSED_MARKERS
    assert not {markers[b] for b in BACKBONES[:3]} & set(plots.FUSED_MARKERS)
    assert markers == plots.backbone_markers(BACKBONES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cost_figure_names_the_front_and_val_best_without_overlapping_names(seed):
    points = summary_table(_many_variants(seed))
    fig, ax, texts = plots.cost_figure(points, val_best_per_arm(points))
    try:
        front = plots.pareto_front(points)
        best = {}
        for arm, part in points.groupby("arm"):
            best[arm] = part.sort_values(["val_mean", "row"], ascending=[False, True]).iloc[0]
        expected = {plots._name(r) for r in front.itertuples()} | {plots._name(r) for r in best.values()}
        names = [t.get_text() for t in texts]
        assert sorted(names) == sorted(expected) and len(names) < len(points)
        assert len(front) >= 3  # enough names to collide if nothing moved them
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in texts]
        for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
            assert not a.overlaps(b), f"labels {names[i]!r} and {names[j]!r} overlap"
        for name, box in zip(names, boxes):
            assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, f"label {name!r} leaves the figure"
            assert fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, f"label {name!r} leaves the figure"
        legends = [c for c in ax.get_children() if c.__class__.__name__ == "Legend"]
        assert {lg.get_title().get_text() for lg in legends} == {"arm", "backbone"}
    finally:
        plots.plt.close(fig)


def test_fewshot_figure_is_drawn_from_the_arms_table(tmp_path):
    rows, results = _typed(_fewshot_rows(CURVES))
    arms = fewshot_arms(results, rows)
    _assert_png(plots.fewshot_curves(arms, tmp_path / "few.png", crossover=crossover(arms)))
    rows, results = _typed(_fewshot_rows({key: v for key, v in CURVES.items() if key[0] == "head"}))
    arms = fewshot_arms(results, rows)
    _assert_png(plots.fewshot_curves(arms, tmp_path / "head_only.png", crossover=crossover(arms)))


def test_the_verdict_compares_the_arms_on_the_draws_both_fitted():
    """Three head draws, one fine-tune draw: pooled, the head's lucky draws put it ahead; on the draw both arms
    fitted (same split seed, same draw seed: the same images) the fine-tune is ahead, and that decides."""
    curves = {("head", 1): [(0, 0, 0.50, None), (0, 1, 0.70, None), (0, 2, 0.72, None)],
              ("finetune", 1): [(0, 0, 0.55, None)],
              ("head", 5): [(0, 0, 0.80, None), (0, 1, 0.90, None)],
              ("finetune", 5): [(0, 0, 0.78, None)]}
    rows, results = _typed(_fewshot_rows(curves))
    arms = fewshot_arms(results, rows)
    assert crossover(arms) is None  # pooled means: 0.64 vs 0.55 at k = 1
    paired = paired_gaps(results, rows)
    assert paired == {1: (pytest.approx(0.05), 1), 5: (pytest.approx(-0.02), 1)}
    assert crossover(arms, paired) == 1
    md = _section(curves)
    table = {c["k per class"]: c for c in table_after(md, "### Few-shot curves")}
    assert [table[k]["fine-tune − head (pts)"] for k in ("1", "5")] == ["+5.0", "-2.0"]
    assert [table[k]["draws compared"] for k in ("1", "5")] == ["1 paired", "1 paired"]
    assert "Fine-tuning overtakes the frozen-feature head from k = 1 images per class (but not at every larger k: " \
           "it is not ahead at k = 5)." in md
