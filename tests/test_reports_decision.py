"""The decision card and the Limitations section on two generated runs over real manifests.

The saturated run is issue 22's case: 4 Caltech classes x 30 images (15 train, 5 val, 10 test each), every
candidate at 100% on val. The old rule broke that tie by val log-loss and picked kNN (log-loss 2e-16, the
weakest on test); the card must say val saturated and decide by cost, whatever the log-losses say.
"""
import json

import numpy as np
import pytest

from pipeline.variant import VariantError, chosen_row
from reports.stage import build_report
from study.metrics import evaluate
from study.results import append_rows, read_results, val_best
from tests.conftest import make_tiny_manifest
from tests.report_checks import predictions, table_after

# (backbone, arm, method, feature set, cost s, val log-loss of the chosen setting, test images wrong per class)
SATURATED = [
    ("efficientnet_lite0", "head", "knn", "clean", 3.0, 2e-16, 2),  # the lowest log-loss, the weakest on test
    ("efficientnet_lite1", "head", "lr", "clean", 1.0, 0.30, 0),    # the cheapest
    ("efficientnet_lite0", "finetune", "ft:last:1", "light", 90.0, 0.05, 0),
    ("efficientnet_lite1", "finetune", "ft:head", "light", 40.0, 0.10, 1),
]


def _row(*, kind, backbone, method, fset, cost, log_loss, wrong, test, val, seed, rng) -> dict:
    y, y_val = test.label.to_numpy(), val.label.to_numpy()
    pred = predictions(y, wrong, rng)
    point = {"params": {"method": method}, "val_mean_per_class": 1.0, "val_log_loss": log_loss}
    return {"kind": kind, "backbone": backbone, "method": method, "feature_set": fset, "split_seed": seed,
            "draw_seed": None, "metrics": evaluate(y, pred, n_classes=4, n_boot=0),
            "test_sample_id": test.sample_id.tolist(), "test_pred": pred.tolist(), "hyperparams": {},
            "train_s": cost, "predict_s": 0.01 * len(y), "feature_s": 5.0 if kind == "head" else None,
            "cache_key": "k", "manifest_hash": "h", "n_train": 60, "n_val": len(y_val), "n_test": len(y),
            "class_names": ["accordion", "anchor", "barrel", "crab"], "fit_on": "train+val",
            "selection": {"points": [point], "chosen": 0, "metric": "val_mean_per_class", "best_epoch": None,
                          "curve": [], "stopped_early": None},
            "val_mean_per_class": 1.0, "val_sample_id": val.sample_id.tolist(), "val_pred": y_val.tolist()}


@pytest.fixture(scope="module")
def saturated(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("saturated")
    df = make_tiny_manifest(tmp / "dataset" / "manifest.csv", n_train=15, n_val=5, n_test=10)
    assert len(df) == 120 and (df.split == "val").sum() == 20
    rng = np.random.default_rng(0)
    rows = [_row(kind=arm, backbone=b, method=m, fset=f, cost=c, log_loss=ll, wrong=w, test=df[df.split == "test"],
                 val=df[df.split == "val"], seed=0, rng=rng) for b, arm, m, f, c, ll, w in SATURATED]
    run_dir = tmp / "run"
    append_rows(run_dir / "results.jsonl", rows)
    (run_dir / "provenance.json").write_text(json.dumps({"device": "cpu", "load_avg": {"start": 3.1, "end": 5.2},
                                                        "wall_s": 321.0, "peak_rss_bytes": 2 ** 31,
                                                        "stage_seconds": {"classify": 12.0, "finetune": 300.0}}))
    (run_dir / "config.resolved.toml").write_text('[data]\ndrop = ["caltech101/Faces_easy"]\n')
    build_report(run_dir=run_dir, dataset_dir=tmp / "dataset", title="Saturated", n_boot=500)
    return run_dir, (run_dir / "report.md").read_text()


def _card(md: str) -> str:
    return md.split("## Decision", 1)[1].split("\n## ", 1)[0]


def test_a_saturated_val_is_said_and_the_choice_is_the_cheapest_not_the_lowest_log_loss(saturated):
    card = _card(saturated[1])
    sentence = card.strip().splitlines()[0]
    assert sentence.startswith("**Use `efficientnet_lite1` frozen features + head** (`lr (clean)`)")
    assert "knn" not in sentence.split("; runner-up")[0]
    assert "**Val saturated**: the best val score is 100.0% (4 of 4 candidates score it)" in card
    assert "not by val log-loss" in card
    # Every other candidate is an exact tie, reported as one.
    assert "**An exact val tie**: `efficientnet_lite0` frozen features + head, `efficientnet_lite0` fine-tune, " \
           "`efficientnet_lite1` fine-tune have the chosen one's val score" in card


def test_the_card_states_test_accuracy_costs_and_the_runner_up_difference(saturated):
    run_dir, md = saturated
    rows = read_results(run_dir / "results.jsonl")
    lr, knn = rows[1], rows[0]  # the choice, and the rule over the others: the cheapest of them (3 + 5 s)
    sentence = _card(md).strip().splitlines()[0]
    assert f"{100 * lr.metrics.mean_per_class:.1f}% test mean per-class accuracy [" in sentence
    assert "6.0 s to train including its features" in sentence  # 1 s + 5 s of features
    assert f"{1000 * lr.predict_s / lr.n_test:.2f} ms per image to predict on top of the frozen backbone" in sentence
    assert "runner-up `efficientnet_lite0` frozen features + head (`knn (clean)`) at 80.0%" in sentence
    diff = lr.metrics.mean_per_class - knn.metrics.mean_per_class
    assert f"the choice minus the runner-up {100 * diff:+.1f} [" in sentence
    assert "Holm-adjusted p = " in sentence


def test_limitations_render_val_size_timing_overlaps_and_near_identical_classes(saturated):
    md = saturated[1]
    limits = md.split("## Limitations", 1)[1].split("\n## ", 1)[0]
    assert "**Val size** (split seed 0): 20 images, 5–5 per class (median 5) over 4 classes" in limits
    assert "by up to 20.0 points and the val mean per-class accuracy by up to 5.0 points" in limits
    assert "**Val saturated** (100% on val)" in limits
    assert "1-minute load average 3.1 at the start and 5.2 at the end" in limits
    assert "`caltech101/Faces_easy`" in limits and "same photographs at two crops" in limits
    assert "pHash" in limits and "not replicates" in limits
    assert "Overlap with the pre-training set" not in limits  # no Imagenette here
    provenance = md.split("## Provenance", 1)[1]
    assert "peak resident memory 2.00 GiB" in provenance and "finetune 300 s" in provenance


def test_the_per_source_table_groups_each_rows_correctness_by_source(saturated):
    table = table_after(saturated[1], "### Per source")
    assert len(table) == 4 and list(table[0])[-1] == "caltech101 % (40 test images)"
    by = {(r["backbone"], r["arm"]): r for r in table}
    assert by[("efficientnet_lite0", "frozen features + head")]["caltech101 % (40 test images)"] == "80.0"
    assert by[("efficientnet_lite1", "frozen features + head")]["decision"] == "**chosen**"


def test_declared_comparisons_are_holm_adjusted_together(saturated):
    table = table_after(saturated[1], "### Chosen head vs chosen fine-tune")
    assert [r["comparison"] for r in table] == ["head minus fine-tune", "head minus fine-tune",
                                                "the choice minus the runner-up"]
    p = [float(r["p (bootstrap)"]) for r in table]
    holm = [float(r["p (Holm)"]) for r in table]
    assert all(h >= q for h, q in zip(holm, p)) and min(holm) == pytest.approx(min(1.0, 3 * min(p)), rel=1e-2)


def test_a_cheaper_candidate_within_val_noise_is_used_and_the_card_says_why(tmp_path, data_root):
    """The fine-tune is one val image ahead (100% against 95% on 20 val images); the head costs a tenth: the val
    difference's interval holds 0, so the card uses the head and names the val-best it passed over."""
    df = make_tiny_manifest(tmp_path / "dataset" / "manifest.csv", n_train=15, n_val=5, n_test=10)
    test, val = df[df.split == "test"], df[df.split == "val"]
    rng = np.random.default_rng(1)
    head = _row(kind="head", backbone="efficientnet_lite0", method="lr", fset="clean", cost=5.0, log_loss=0.2,
                wrong=1, test=test, val=val, seed=0, rng=rng)
    head_val = np.array(head["val_pred"])
    head_val[0] = 1  # one val image of class 0 wrong: that class at 4/5, the mean per-class at 95%
    head.update(val_pred=head_val.tolist(), val_mean_per_class=0.95)
    head["selection"]["points"][0]["val_mean_per_class"] = 0.95
    ft = _row(kind="finetune", backbone="efficientnet_lite0", method="ft:last:1", fset="light", cost=100.0,
              log_loss=0.1, wrong=0, test=test, val=val, seed=0, rng=rng)
    append_rows(tmp_path / "run" / "results.jsonl", [head, ft])
    build_report(run_dir=tmp_path / "run", dataset_dir=tmp_path / "dataset", title="Noise", n_boot=500)
    card = _card((tmp_path / "run" / "report.md").read_text())
    assert card.strip().startswith("**Use `efficientnet_lite0` frozen features + head**")
    assert ("the val-best, `efficientnet_lite0` fine-tune, 100.0%, was ahead by +5.0 [+0.0, +15.0] pts on val — "
            "within val noise, so the cheaper one is used (10.0 s against 100.0 s to train)") in card
    assert "runner-up `efficientnet_lite0` fine-tune" in card
    assert "**Val saturated**: the best val score is 100.0% (1 of 2 candidates scores it): val has no room" in card
    # What predict uses is what the card names, not the val-best: its 'chosen' reads the report's decision.
    rows = read_results(tmp_path / "run" / "results.jsonl")
    assert chosen_row(rows, tmp_path / "run").kind == "head" and val_best(rows).kind == "finetune"
    assert json.loads((tmp_path / "run" / "decision.json").read_text())["row"] == 0
    (tmp_path / "run" / "decision.json").unlink()  # before a report: the val-best, with a warning
    assert chosen_row(rows, tmp_path / "run").kind == "finetune"
    stale = {"row": 0, "backbone": "efficientnet_lite0", "kind": "finetune", "method": "lr", "feature_set": "clean",
             "split_seed": 0}  # results.jsonl rewritten after the report: row 0 is no longer what it names
    (tmp_path / "run" / "decision.json").write_text(json.dumps(stale))
    with pytest.raises(VariantError, match="is not that row of results.jsonl now"):
        chosen_row(rows, tmp_path / "run")
    (tmp_path / "run" / "decision.json").write_text("{")
    with pytest.raises(VariantError, match="decision.json is unreadable"):
        chosen_row(rows, tmp_path / "run")


def test_the_card_says_when_a_head_chose_by_cross_validation_against_a_fine_tune_chosen_on_val(tmp_path, data_root):
    df = make_tiny_manifest(tmp_path / "dataset" / "manifest.csv", n_train=15, n_val=5, n_test=10)
    test, val = df[df.split == "test"], df[df.split == "val"]
    rng = np.random.default_rng(2)
    kw = dict(log_loss=0.1, wrong=0, test=test, val=val, seed=0, rng=rng)
    head = _row(kind="head", backbone="efficientnet_lite0", method="lr", fset="clean", cost=5.0, **kw)
    ft = _row(kind="finetune", backbone="efficientnet_lite0", method="ft:last:1", fset="light", cost=100.0, **kw)
    cards = []
    for metric in ("val_mean_per_class", "5-fold cross-validation on train+val (val < 10 per class)"):
        head["selection"] = {**head["selection"], "metric": metric}
        run = tmp_path / metric[:3]
        append_rows(run / "results.jsonl", [head, ft])
        build_report(run_dir=run, dataset_dir=tmp_path / "dataset", title="CV", n_boot=200)
        cards.append(_card((run / "report.md").read_text()))
    assert "Val scores are not equally optimistic" not in cards[0]
    assert "Val scores are not equally optimistic" in cards[1] and "leans toward the fine-tune" in cards[1]
