"""The report's choices are made on val, over several split seeds, from a hand-made results file.

The rows are built so that on every count the val-best and the test-best differ: a report that
picked on test would name other rows than the ones asserted here.
"""
import json

import numpy as np
import pandas as pd
import pytest

from reports.collect import results_table
from reports.render import FEWSHOT_DETAIL, protocol_arm_lines
from reports.stage import build_report, record_end
from reports.tables import Tables
from study.metrics import evaluate
from study.provenance import end_provenance, start_provenance
from study.results import ResultRow, append_rows, read_results
from tests.conftest import make_tiny_manifest
from tests.report_checks import assert_comparison_traces, assert_pngs_valid, table_after

CLASSES = ["accordion", "anchor", "barrel", "crab"]
# (kind, method, feature_set) -> per split seed: (val mean per-class, number of wrong test images).
# Seed 0: val picks lr (clean) and ft:last:1, test would pick lr (aug) and ft:head.
# Seed 1: val picks lr (aug) and ft:last:1. Over both seeds the head (val 91.0) is the val-best (backbone, arm),
# the fine-tune (val 88.5) the test-best: 6.5 wrong test images a seed against 6.
PLAN = {
    ("head", "lr", "clean"): {0: (0.90, 10), 1: (0.91, 6)},
    ("head", "lr", "aug"): {0: (0.80, 1), 1: (0.92, 3)},
    ("finetune", "ft:head", "light"): {0: (0.85, 2), 1: (0.84, 1)},
    ("finetune", "ft:last:1", "light"): {0: (0.88, 5), 1: (0.89, 7)},
}


def _pred(y: np.ndarray, n_wrong: int, rng) -> np.ndarray:
    pred = y.copy()
    wrong = rng.choice(len(y), size=n_wrong, replace=False)
    pred[wrong] = (y[wrong] + 1) % len(CLASSES)
    return pred


def _base(*, kind, method, feature_set, seed, y, pred, ids) -> dict:
    scores = np.eye(len(CLASSES))[pred] + 0.01
    return {"kind": kind, "backbone": "efficientnet_lite0", "method": method, "feature_set": feature_set,
            "seed": seed, "k_per_class": None, "tta": "hflip",
            "metrics": evaluate(y, pred, scores, n_classes=len(CLASSES), n_boot=50, seed=seed),
            "test_sample_id": ids, "test_pred": pred.tolist(), "train_s": 3.0, "predict_s": 0.1,
            "cache_key": "k", "manifest_hash": "h", "n_train": 24, "n_val": 8, "n_test": len(y),
            "class_names": CLASSES, "trainable_params": 100}


def _head(val: float, **kw) -> dict:
    # Three grid points; the chosen one (C=1) has the row's val score, the others less.
    grid = [{"params": {"C": c}, "val_mean_per_class": v, "val_log_loss": 0.5}
            for c, v in ((0.1, val - 0.05), (1.0, val), (10.0, val - 0.1))]
    return {**_base(**kw), "hyperparams": {"C": 1.0}, "selection": grid, "val_mean_per_class": val,
            "fit_on": "train+val", "views": 0 if kw["feature_set"] == "clean" else 2, "feature_s": 10.0}


def _finetune(val: float, **kw) -> dict:
    curve = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_mean_per_class": val - 0.1 * (e != 1)} for e in range(3)]
    return {**_base(**kw), "hyperparams": {"lr": 0.01, "views": 2, "path": "prefix_cache"}, "epochs_run": 3,
            "selection": {"metric": "val_mean_per_class", "best_epoch": 1, "best_score": val, "curve": curve,
                          "stopped_early": False},
            "val_mean_per_class": val, "fit_on": "train", "views": 2, "views_fresh": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("verdict")
    dataset_dir, run_dir = tmp / "dataset", tmp / "run"
    run_dir.mkdir()
    test = make_tiny_manifest(dataset_dir / "manifest.csv").query("split == 'test'")
    y, ids = test.label.to_numpy(), test.sample_id.tolist()
    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1):
        for (kind, method, fset), by_seed in PLAN.items():
            val, n_wrong = by_seed[seed]
            make = _head if kind == "head" else _finetune
            rows.append(make(val, kind=kind, method=method, feature_set=fset, seed=seed, y=y,
                             pred=_pred(y, n_wrong, rng), ids=ids))
    # Few-shot: at k=1 two different draws; at k=3 two draws with the same predictions (one fit).
    for k, preds in ((1, [_pred(y, 9, rng), _pred(y, 7, rng)]), (3, [_pred(y, 4, rng)] * 2)):
        for draw, pred in enumerate(preds):
            rows.append({**_base(kind="fewshot", method="lr", feature_set="clean", seed=draw, y=y, pred=pred, ids=ids),
                         "k_per_class": k, "hyperparams": {"C": 1.0}, "selection": None, "fit_on": "train+val",
                         "views": 0})
    append_rows(run_dir / "results.jsonl", rows)
    prov = start_provenance(run_dir=run_dir, repo=tmp, argv=["run_study.py"], device="cpu")
    build_report(run_dir=run_dir, dataset_dir=dataset_dir, title="Verdict")
    return run_dir, dataset_dir, prov


def _results(run_dir):
    return results_table(read_results(run_dir / "results.jsonl"))


def _row_of(results, method, fset, seed):
    return results[(results.method == method) & (results.feature_set == fset) & (results.split_seed == seed)].iloc[0]


def test_the_fixture_separates_val_best_from_test_best(run):
    results = _results(run[0])
    for arm in ("head", "finetune"):
        part = results[(results.arm == arm) & (results.split_seed == 0)]
        assert part.loc[part.val_mean_per_class.idxmax(), "row"] != part.loc[part.mean_per_class.idxmax(), "row"]


def test_summary_is_one_line_per_backbone_and_arm_with_each_seeds_method_aggregated_by_hand(run):
    run_dir = run[0]
    results = _results(run_dir)
    summary = pd.read_csv(run_dir / "summary.csv")
    assert list(summary.columns) == ["backbone", "arm", "methods", "n_seeds", "mean", "lo", "hi", "spread",
                                     "val_mean", "cost", "infer_ms", "chosen"]
    by_arm = {s.arm: s for s in summary.itertuples()}
    assert by_arm["head"].methods == "lr (clean) on seed 0; lr (aug) on seed 1"  # each seed's val choice
    assert by_arm["finetune"].methods == "ft:last:1 (light)"
    assert by_arm["head"].chosen and not by_arm["finetune"].chosen
    chosen = {"head": [("lr", "clean", 0), ("lr", "aug", 1)],
              "finetune": [("ft:last:1", "light", 0), ("ft:last:1", "light", 1)]}
    for arm, picks in chosen.items():
        s = by_arm[arm]
        test = [_row_of(results, m, f, seed).mean_per_class for m, f, seed in picks]
        vals = [PLAN[(arm, m, f)][seed][0] for m, f, seed in picks]
        assert s.n_seeds == 2
        assert s.mean == pytest.approx((test[0] + test[1]) / 2)
        assert s.spread == pytest.approx(abs(test[0] - test[1]) / np.sqrt(2))  # sample sd of two values
        assert s.val_mean == pytest.approx((vals[0] + vals[1]) / 2)
        assert s.lo <= s.mean <= s.hi


def test_verdict_per_seed_uses_that_seeds_val_chosen_pair_and_averages_by_hand(run):
    run_dir, dataset_dir, _ = run
    rows = read_results(run_dir / "results.jsonl")
    results = results_table(rows)
    labels = dict(zip(*pd.read_csv(dataset_dir / "manifest.csv")[["sample_id", "label"]].T.values))
    (v,) = Tables.from_rows(rows, labels_by_id=labels, n_boot=500).verdicts
    expected_pairs = {0: (("lr", "clean"), ("ft:last:1", "light")), 1: (("lr", "aug"), ("ft:last:1", "light"))}
    diffs = []
    for s in v.seeds:
        (hm, hf), (fm, ff) = expected_pairs[s.seed]
        assert (s.head.method, s.head.feature_set, s.finetune.method) == (hm, hf, fm)
        diffs.append(_row_of(results, hm, hf, s.seed).mean_per_class - _row_of(results, fm, ff, s.seed).mean_per_class)
        assert s.diff == pytest.approx(diffs[-1]) and s.lo <= s.diff <= s.hi
    assert v.comparison.diff.value == pytest.approx(np.mean(diffs))
    assert v.comparison.diff.spread == pytest.approx(abs(diffs[0] - diffs[1]) / np.sqrt(2))
    assert v.comparison.diff.lo <= v.comparison.diff.value <= v.comparison.diff.hi
    md = (run_dir / "report.md").read_text()
    table = table_after(md, "- **efficientnet_lite0**: head minus fine-tune")
    assert [(c["seed"], c["chosen head"].split("`")[1]) for c in table] == [("0", "lr (clean)"), ("1", "lr (aug)")]
    assert "McNemar p (top-1)" in table[0]  # McNemar stays, labelled as the top-1 test it is
    declared = table_after(md, "### Chosen head vs chosen fine-tune")
    assert [c["comparison"] for c in declared] == ["head minus fine-tune"]  # the headline pair is the same pair
    assert declared[0]["p (Holm)"] == declared[0]["p (bootstrap)"]  # a family of one


def test_the_decision_names_the_val_best_not_the_test_best(run):
    run_dir = run[0]
    md = (run_dir / "report.md").read_text()
    card = md.split("## Decision", 1)[1].split("\n## ", 1)[0]
    sentence = card.strip().splitlines()[0]
    assert sentence.startswith("**Use `efficientnet_lite0` frozen features + head** (`lr (clean)` on seed 0; "
                               "`lr (aug)` on seed 1)")
    assert "runner-up `efficientnet_lite0` fine-tune (`ft:last:1 (light)`)" in sentence
    assert "mean over 2 split seeds" in sentence and "the choice minus the runner-up" in sentence
    assert f"python -m pipeline.predict --run {run_dir} --variant 0 IMAGES_OR_FOLDERS" in card
    assert f"python -m pipeline.predict --run {run_dir} --variant 0 --export exported" in card
    assert "row 0 of `results.jsonl`" in card
    # pipeline.predict's 'chosen' is the row the card names, read from the decision the report wrote.
    assert json.loads((run_dir / "decision.json").read_text())["row"] == 0
    errors = md.split("### Where the chosen model fails", 1)[1].split("\n\n", 2)[1]
    assert "`lr (clean)`, split seed 0" in errors
    chosen_cells = [c for c in table_after(md, "## Comparison") if c["chosen on val"]]
    assert {(c["method"], c["features / aug"], c["seed"]) for c in chosen_cells} == {
        ("lr", "clean", "0"), ("ft:last:1", "light", "0"), ("lr", "aug", "1"), ("ft:last:1", "light", "1")}
    assert assert_comparison_traces(run_dir) == 8


def test_results_csv_has_the_machine_readable_columns(run):
    csv = pd.read_csv(run[0] / "results.csv")
    assert {"split_seed", "draw_seed", "arm", "fit_on", "val_mean_per_class", "mean_per_class"} <= set(csv.columns)
    main = csv[csv.kind != "fewshot"]
    assert set(main.arm) == {"head", "finetune"}
    assert set(zip(main.arm, main.fit_on)) == {("head", "train+val"), ("finetune", "train")}
    assert main.mean_per_class_lo.notna().all()  # each seed's interval


def test_fewshot_draws_that_are_one_fit_count_once(run):
    md = (run[0] / "report.md").read_text()
    assert "head arm: mean per-class" not in md  # one arm's curve: no arms table, only the per-variant one
    few = {c["k per class"]: c for c in table_after(md, FEWSHOT_DETAIL)}
    assert few["1"]["distinct draws"] == "2" and few["1"]["sd"] != "–"
    assert few["3"]["distinct draws"] == "1 (2 identical draws)" and few["3"]["sd"] == "–"


def test_protocol_text_matches_the_rows(run):
    run_dir = run[0]
    raw = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    md = (run_dir / "report.md").read_text()
    protocol = md.split("## Protocol", 1)[1].split("\n## ", 1)[0]
    for arm, name in (("head", "frozen features + head"), ("finetune", "fine-tune")):
        seed0 = [r for r in raw if r["kind"] == arm and r["split_seed"] == 0]
        (line,) = [x for x in protocol.splitlines() if x.startswith(f"- **{name}**")]
        settings = sum(len(r["selection"]["points"]) if arm == "head" else 1 for r in seed0)
        assert f"{len(seed0)} tuner search(es) per split seed" in line
        assert f"{settings} settings scored on val in all" in line  # rows without trials: their selections
        assert {r["fit_on"] for r in seed0} == {f for f in ("train+val", "train") if f"`{f}`;" in line}
    assert "clean + 2 fixed augmented views per image, cached once and reused every epoch" in protocol
    assert "fit on different data" in protocol
    # The text follows the rows: fine-tunes refit on train+val and fresh views change it.
    rows = [ResultRow.from_dict({**r, "fit_on": "train+val", "views_fresh": r["kind"] == "finetune"}, index=i)
            for i, r in enumerate(raw)]
    text = "\n".join(protocol_arm_lines(rows))
    assert "fit on different data" not in text and "a fresh augmentation every step" in text
    assert text.count("refit on `train+val`") == 2  # both arms


def test_training_curves_are_drawn_and_linked(run):
    linked = assert_pngs_valid(run[0])
    assert "training_curves.png" in linked


def test_provenance_ends_after_the_report_is_written(run):
    run_dir, _, prov = run
    before = (run_dir / "report.md").read_text()
    assert "(running)" not in before and "report written before the run ended" in before
    assert "not in provenance.json yet" in before
    end_provenance(run_dir=run_dir, prov=prov, status="ok")
    recorded = json.loads((run_dir / "provenance.json").read_text())
    # What a run's resource monitor adds at its end (study/provenance.py on the branch that records it).
    recorded["load_avg"] = {"start": 1.5, "end": 2.5}
    (run_dir / "provenance.json").write_text(json.dumps(recorded))
    record_end(run_dir=run_dir)
    after = (run_dir / "report.md").read_text()
    assert f"ended {recorded['ended']} (status ok)" in after
    assert "1-minute load average 1.5 at the start and 2.5 at the end of the run" in after
    assert "1-minute load average: 1.5 at the start, 2.5 at the end" in after.split("## Provenance")[1]

    def kept(text):  # everything before Provenance but the timing line
        return [x for x in text.split("## Provenance")[0].splitlines() if not x.startswith("- **Timing conditions**")]
    assert kept(after) == kept(before)  # nothing else rewritten


def test_a_run_reports_how_it_ended(tmp_path):
    import run_study
    args = ["--config", "configs/quick.toml", "--stages", "report", "--data-root", str(tmp_path),
            "--out", str(tmp_path)]
    assert run_study.main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    ended = json.loads((run_dir / "provenance.json").read_text())["ended"]
    assert f"ended {ended} (status ok)" in (run_dir / "report.md").read_text()


def test_a_row_whose_val_score_is_not_its_chosen_settings_is_refused():
    from study.results import check_row
    row = {"kind": "head", "backbone": "b", "method": "lr", "feature_set": "clean", "seed": 0, "hyperparams": {},
           "metrics": {"top1": 0.5, "mean_per_class": 0.5, "macro_f1": 0.5}, "train_s": 1.0, "predict_s": 1.0,
           "cache_key": "k", "manifest_hash": "h", "n_train": 1, "n_test": 1, "val_mean_per_class": 0.9,
           "selection": [{"params": {"C": 1}, "val_mean_per_class": 0.9},
                         {"params": {"C": 2}, "val_mean_per_class": 0.8}]}
    assert check_row(row) is row
    with pytest.raises(ValueError, match="best setting of its selection scored 0.9"):
        check_row({**row, "val_mean_per_class": 0.8})


def test_an_exact_val_tie_between_the_arms_is_a_tie_settled_by_cost(run):
    from dataclasses import replace

    from reports.render import ReportInputs
    from reports.sections import section_card
    run_dir, dataset_dir, _ = run
    rows = read_results(run_dir / "results.jsonl")
    labels = dict(zip(*pd.read_csv(dataset_dir / "manifest.csv")[["sample_id", "label"]].T.values))
    tied = [replace(r, val_mean_per_class=0.95, selection=None) if r.kind != "fewshot" else r for r in rows]
    tables = Tables.from_rows(tied, labels_by_id=labels, n_boot=200)
    card = "\n".join(section_card(ReportInputs(tables=tables, summary=None, skips=[], provenance={}, config={},
                                               figures={})))
    # Head and fine-tune both at 95.0% on val: a tie, settled by cost (fine-tunes 3 s here, heads 3 + 10 s), not
    # by row order (heads come first) and not by log-loss.
    assert tables.card.chosen.arm == "finetune" and "**Use `efficientnet_lite0` fine-tune**" in card
    assert "**An exact val tie**: `efficientnet_lite0` frozen features + head has the chosen one's val score" in card
