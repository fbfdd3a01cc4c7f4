"""Both arms' few-shot fits compared per backbone on the same drawn images, from hand-made rows over a hand-made
manifest.

The rows are built so that each rule shows in the numbers: a fine-tune ahead within its interval is no crossover,
one ahead beyond it is; a head draw the fine-tune did not fit pairs with nothing; fits repeated exactly (k = the
whole pool) count once; a backbone with one arm only is shown alone.
"""
import numpy as np
import pandas as pd
import pytest

from reports import plots
from reports.collect import crossovers, fewshot_pairs
from reports.render import FEWSHOT_DETAIL, ReportInputs, section_fewshot
from reports.stage import build_report
from reports.tables import Tables
from study.metrics import evaluate
from study.results import ResultRow, append_rows
from tests.report_checks import assert_on_canvas, pct, predictions, table_after, write_manifest_for

CLASSES = ["accordion", "anchor", "barrel", "crab"]
# Each split seed's test set: 10 images per class; the seeds share half of them.
IDS = {s: [f"img{c}_{j}" for c in range(4) for j in range(5 * s, 5 * s + 10)] for s in (0, 1)}
LABELS_BY_ID = {i: int(i[3]) for ids in IDS.values() for i in ids}
HEAD = {"backbone": "efficientnet_lite0", "method": "lr", "feature_set": "clean"}
FT = {"backbone": "efficientnet_lite0", "method": "ft:last:1", "feature_set": "light"}

# (arm, k) -> [(split seed, draw seed, wrong test images per class, or a fixed prediction key)]
PLAN = {
    ("head", 1): [(0, 0, 3)], ("finetune", 1): [(0, 0, 2)],  # ahead by 10 pts on one pair: within its interval
    ("head", 5): [(0, 0, 4), (0, 1, 4), (1, 1, 4), (0, 3, 0)],  # draw 3: the head's alone, pairs with nothing
    ("finetune", 5): [(0, 0, 0), (0, 1, 0), (1, 1, 0)],  # ahead by 40 pts on three pairs: a crossover
    ("head", 10): [(0, 0, 0), (1, 1, 0)], ("finetune", 10): [(0, 0, 4), (1, 1, 4)],  # the head ahead
    ("head", 20): [(0, 0, "pool"), (0, 1, "pool")], ("finetune", 20): [(0, 0, "pool-ft"), (0, 1, "pool-ft")],
}


def _fewshot_rows(plan: dict, *, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    fixed = {}
    out = []
    for (arm, k), draws in plan.items():
        for split_seed, draw, wrong in draws:
            ids = IDS[split_seed]
            y = np.array([LABELS_BY_ID[i] for i in ids])
            if isinstance(wrong, str):  # the whole pool: every draw is the same fit
                pred = fixed.setdefault((wrong, split_seed), predictions(y, 1 if wrong == "pool" else 2, rng))
            else:
                pred = predictions(y, wrong, rng)
            out.append({**(HEAD if arm == "head" else FT), "kind": "fewshot", "seed": draw, "split_seed": split_seed,
                        "k_per_class": k, "metrics": evaluate(y, pred, n_classes=4, n_boot=0),
                        "test_sample_id": ids, "test_pred": pred.tolist(), "hyperparams": {}, "train_s": 1.0,
                        "predict_s": 0.1, "cache_key": "k", "manifest_hash": "h", "n_train": 4 * k, "n_test": len(ids),
                        "class_names": CLASSES, "fit_on": "train+val", "selection": None,
                        "val_mean_per_class": None})
    # Each split seed's head row: its train set is 20 images per class, so k = 20 draws take all of it.
    for split_seed in sorted({s for draws in plan.values() for s, _, _ in draws}):
        ids = IDS[split_seed]
        y = np.array([LABELS_BY_ID[i] for i in ids])
        out.append({**out[0], **HEAD, "kind": "head", "seed": split_seed, "split_seed": split_seed,
                    "k_per_class": None, "metrics": evaluate(y, y, n_classes=4, n_boot=0), "test_sample_id": ids,
                    "test_pred": y.tolist(), "n_train": 4 * 20, "n_test": len(ids)})
    return out


def _typed(raw: list[dict]) -> list[ResultRow]:
    return [ResultRow.from_dict(r, index=i) for i, r in enumerate(raw)]


def test_fewshot_rows_of_the_finetune_arm_belong_to_it():
    base = _fewshot_rows({("head", 1): [(0, 0, 1)]})[0]
    arm = {(kind, method): ResultRow.from_dict({**base, "kind": kind, "method": method}, index=0).arm
           for kind, method in (("fewshot", "ft:last:1"), ("fewshot", "ft:probe+last:2"), ("fewshot", "lr"),
                                ("finetune", "ft:head"), ("head", "svm"))}
    assert arm == {("fewshot", "ft:last:1"): "finetune", ("fewshot", "ft:probe+last:2"): "finetune",
                   ("fewshot", "lr"): "head", ("finetune", "ft:head"): "finetune", ("head", "svm"): "head"}


def test_pairs_are_the_draws_both_arms_fitted_on_the_same_images():
    rows = _typed(_fewshot_rows(PLAN))
    pairs = fewshot_pairs(rows, LABELS_BY_ID, n_boot=1000).set_index("k_per_class")
    assert list(pairs.index) == [1, 5, 10, 20]
    assert list(pairs.pairs) == [1, 3, 2, 1]  # k = 5: the head's draw 3 has no partner; k = 20: one fit, twice
    by = {(r.arm, r.k_per_class, r.split_seed, r.seed): r.metrics.mean_per_class for r in rows}
    for k in (1, 5, 10):
        keys = [(s, d) for s, d, _ in PLAN[("finetune", k)]]
        by_hand = np.mean([by[("finetune", k, s, d)] - by[("head", k, s, d)] for s, d in keys])
        assert pairs.loc[k, "diff"] == pytest.approx(by_hand)
        assert pairs.loc[k, "head"] == pytest.approx(np.mean([by[("head", k, s, d)] for s, d in keys]))
    assert pairs.loc[1, "diff"] == pytest.approx(0.10) and pairs.loc[1, "lo"] < 0 < pairs.loc[1, "hi"]
    assert pairs.loc[5, "diff"] == pytest.approx(0.40) and pairs.loc[5, "lo"] > 0
    assert pairs.loc[10, "hi"] < 0


def test_a_crossover_needs_an_interval_above_zero():
    rows = _typed(_fewshot_rows(PLAN))
    assert crossovers(fewshot_pairs(rows, LABELS_BY_ID, n_boot=1000)) == {"efficientnet_lite0": 5}
    # Ahead only within its interval (k = 1) is no crossover.
    only_k1 = _typed(_fewshot_rows({key: v for key, v in PLAN.items() if key[1] == 1}))
    assert crossovers(fewshot_pairs(only_k1, LABELS_BY_ID, n_boot=1000)) == {"efficientnet_lite0": None}


def _section(plan: dict, *, figures=None) -> str:
    tables = Tables.from_rows(_typed(_fewshot_rows(plan)), labels_by_id=LABELS_BY_ID, n_boot=500)
    inp = ReportInputs(tables=tables, summary=None, skips=[], provenance={}, config={}, figures=figures or {})
    return "\n".join(section_fewshot(inp))


def test_the_section_gives_each_k_its_paired_difference_and_declares_only_what_the_interval_shows():
    md = _section(PLAN, figures={"fewshot": "fewshot.png"})
    table = {c["k per class"]: c for c in table_after(md, "**efficientnet_lite0**")}
    assert list(table) == ["1", "5", "10", "20"]
    gap = "fine-tune − head (pts) [95% interval]"
    assert table["5"]["draws (pairs)"] == "3" and table["5"][gap].startswith("+40.0 [")
    assert table["1"][gap].startswith("+10.0 [-")
    assert "Fine-tuning is ahead beyond its interval from k = 5." in md
    assert "The head is ahead beyond its interval at k = 10." in md
    detail = table_after(md, FEWSHOT_DETAIL)
    assert {(c["arm"], c["k per class"]) for c in detail} >= {("fine-tune", "20"), ("frozen features + head", "1")}
    assert md.index("**efficientnet_lite0**") < md.index(FEWSHOT_DETAIL) < md.index("](fewshot.png)")


def test_the_section_with_only_the_head_arm_keeps_the_per_variant_table():
    md = _section({key: v for key, v in PLAN.items() if key[0] == "head"})
    assert "No backbone has both arms' few-shot fits on the same drawn images" in md and "ahead beyond" not in md
    rows = {(c["backbone"], c["k per class"]): c for c in table_after(md, FEWSHOT_DETAIL)}
    assert rows[("efficientnet_lite0", "20")]["distinct draws"] == "1 (2 identical draws)"
    assert rows[("efficientnet_lite0", "1")]["mean per-class % (mean)"] == pct(1 - 3 / 10)


def test_a_report_with_both_arms_draws_the_paired_differences(tmp_path):
    run_dir = tmp_path / "run"
    append_rows(run_dir / "results.jsonl", _fewshot_rows(PLAN))
    write_manifest_for(tmp_path / "dataset" / "manifest.csv", LABELS_BY_ID, CLASSES)
    build_report(run_dir=run_dir, dataset_dir=tmp_path / "dataset", title="Few-shot", n_boot=300)
    md = (run_dir / "report.md").read_text()
    assert "from k = 5." in md and "](fewshot.png)" in md
    assert (run_dir / "fewshot.png").read_bytes()[:4] == b"\x89PNG"


def test_the_fewshot_figure_marks_the_chosen_backbone_and_stays_on_its_canvas():
    pairs = fewshot_pairs(_typed(_fewshot_rows(PLAN)), LABELS_BY_ID, n_boot=300)
    other = pairs.assign(backbone="efficientnet_lite2")
    both = pd.concat([pairs, other], ignore_index=True)
    fig = plots.fewshot_differences(both, chosen_backbone="efficientnet_lite2", crossovers=crossovers(both))
    try:
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels == ["efficientnet_lite0; ahead from k = 5", "efficientnet_lite2 (val-chosen); ahead from k = 5"]
        assert assert_on_canvas(fig) > 5
    finally:
        plots.plt.close(fig)


def test_draws_of_different_images_count_apart_even_when_their_predictions_agree():
    """Two k = 5 draws (different images) that happen to predict alike are two fits, not one: only draws that took
    the whole train set are the same fit."""
    md = _section({("head", 5): [(0, 0, "alike"), (0, 1, "alike")], ("head", 20): [(0, 0, "pool"), (0, 1, "pool")]})
    rows = {c["k per class"]: c for c in table_after(md, FEWSHOT_DETAIL)}
    assert rows["5"]["distinct draws"] == "2" and rows["5"]["sd"] == pct(0.0)
    assert rows["20"]["distinct draws"] == "1 (2 identical draws)"


def test_the_draws_of_one_k_are_one_line_whatever_method_each_draw_chose():
    raw = _fewshot_rows({("head", 1): [(0, 0, 3), (0, 1, 1), (0, 2, 2)]})
    raw[1] = {**raw[1], "method": "svm"}  # each draw is its own search: the second chose an SVM
    tables = Tables.from_rows(_typed(raw), labels_by_id=LABELS_BY_ID, n_boot=200)
    inp = ReportInputs(tables=tables, summary=None, skips=[], provenance={}, config={}, figures={})
    (line,) = table_after("\n".join(section_fewshot(inp)), FEWSHOT_DETAIL)
    assert line["method"] == "lr, svm" and line["distinct draws"] == "3"
    assert line["mean per-class % (mean)"] == pct(np.mean([1 - 3 / 10, 1 - 1 / 10, 1 - 2 / 10]))
