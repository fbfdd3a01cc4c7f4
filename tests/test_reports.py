"""Report rendering on generated predictions over the tiny real manifest (the e2e test covers real results)."""
import numpy as np
import pytest

from reports.stage import build_report
from reports.stats import mcnemar
from study.metrics import evaluate
from study.results import append_rows, append_skip, read_results
from tests.conftest import make_tiny_manifest
from tests.report_checks import assert_comparison_traces, assert_pngs_valid, table_after

METHODS = [("head", "lr", "clean"), ("head", "lr", "aug"), ("head", "knn", "clean"),
           ("finetune", "ft:head", "light"), ("finetune", "ft:last:1", "light")]


def _row(*, kind, method, feature_set, y, pred, test_ids, k=None, seed=0, n_classes=4, rng):
    scores = rng.random((len(y), n_classes))
    scores[np.arange(len(y)), pred] += 1
    return {"kind": kind, "backbone": "efficientnet_lite0", "method": method, "feature_set": feature_set,
            "seed": seed, "k_per_class": k, "metrics": evaluate(y, pred, scores, n_classes=n_classes, n_boot=100),
            "test_sample_id": test_ids, "test_pred": pred.tolist(), "hyperparams": {"C": 1.0},
            "train_s": float(rng.random() * 50), "predict_s": 0.2, "cache_key": "k", "manifest_hash": "h",
            "n_train": 24, "n_val": 8, "n_test": len(y), "class_names": ["accordion", "anchor", "barrel", "crab"],
            "trainable_params": 5124, **({"tta": "hflip"} if kind == "finetune" else {})}


@pytest.fixture
def run_dir(tmp_path, data_root):
    dataset_dir, run = tmp_path / "dataset", tmp_path / "run"
    run.mkdir()
    df = make_tiny_manifest(dataset_dir / "manifest.csv")
    test = df[df.split == "test"]
    y, ids = test.label.to_numpy(), test.sample_id.tolist()
    rng = np.random.default_rng(0)
    rows = []
    for kind, method, fset in METHODS:
        pred = np.where(rng.random(len(y)) < 0.75, y, rng.integers(0, 4, len(y)))
        rows.append(_row(kind=kind, method=method, feature_set=fset, y=y, pred=pred, test_ids=ids, rng=rng))
    for k in (1, 3):
        for seed in (0, 1):
            pred = np.where(rng.random(len(y)) < 0.3 * k, y, rng.integers(0, 4, len(y)))
            rows.append(_row(kind="fewshot", method="lr", feature_set="clean", y=y, pred=pred, test_ids=ids,
                             k=k, seed=seed, rng=rng))
    append_rows(run / "results.jsonl", rows)
    append_skip(run, stage="extract", what="resnet50", reason="weights unavailable", fix="put FILE in DIR")
    build_report(run_dir=run, dataset_dir=dataset_dir, title="Test report")
    return run


def test_every_table_number_traces_to_a_results_row(run_dir):
    assert assert_comparison_traces(run_dir) == len(METHODS)


def test_protocol_warns_when_the_arms_used_different_test_time_augmentation(run_dir):
    md = (run_dir / "report.md").read_text()
    assert "heads `none`, fine-tuning `hflip`" in md and "not like for like" in md


def test_figures_are_valid_pngs_and_tables_are_written(run_dir):
    linked = assert_pngs_valid(run_dir)
    assert {"accuracy_by_method.png", "accuracy_vs_cost.png", "confusion_best.png", "per_class_best.png",
            "fewshot.png"} <= set(linked)
    import pandas as pd
    results = pd.read_csv(run_dir / "results.csv")
    assert len(results) == len(METHODS) + 4
    per_class = pd.read_csv(run_dir / "per_class.csv")
    assert len(per_class) == 4 * len(results)


def test_skips_and_augmentation_effect_are_reported(run_dir):
    md = (run_dir / "report.md").read_text()
    skipped = table_after(md, "## Skipped")
    assert skipped == [{"stage": "extract", "what": "resnet50", "reason": "weights unavailable", "fix": "put FILE in DIR"}]
    aug = table_after(md, "### Effect of the feature sets")
    assert [a["head"] for a in aug] == ["lr"]
    # The deltas are the rows' own figures: aug minus clean, on val and on test.
    pick = {r.feature_set: r for r in read_results(run_dir / "results.jsonl") if r.kind == "head" and r.method == "lr"}
    dtest = 100 * (pick["aug"].metrics.mean_per_class - pick["clean"].metrics.mean_per_class)
    assert pick["aug"].val_mean_per_class is None  # these hand-made rows carry no val score: shown as a dash
    assert aug[0]["+ augmented views: Δ val / Δ test pts"] == f"– / {dtest:+.1f}"


def test_mcnemar_counts_discordant_pairs():
    from types import SimpleNamespace as Row  # McNemar reads only these three fields of a ResultRow
    labels = {"a": 0, "b": 1, "c": 2, "d": 0}
    row_a = Row(method="x", test_sample_id=["a", "b", "c", "d"], test_pred=[0, 1, 2, 1])
    row_b = Row(method="y", test_sample_id=["d", "c", "b", "a"], test_pred=[0, 0, 0, 0])
    t = mcnemar(row_a, row_b, labels_by_id=labels)
    assert (t.n_common, t.only_a, t.only_b) == (4, 2, 1)
    assert 0 < t.p_value <= 1
    with pytest.raises(ValueError, match="share no test sample"):
        mcnemar(row_a, Row(method="z", test_sample_id=["q"], test_pred=[0]), labels_by_id=labels)
