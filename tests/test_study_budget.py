"""Both arms tuned alike, end to end on the tiny manifest: the classify and finetune stages of one split seed run
the same number of tuner trials per backbone (trials.jsonl), every trial a row with its arm, parameters, val score,
state and seconds, and each arm's row names the trial it chose."""
from __future__ import annotations

import json
import shutil

import pytest

from pipeline.config import load_config
from study.context import StudyContext
from study.results import read_results, read_trials
from tests.conftest import TEST_BACKBONE

pytestmark = pytest.mark.needs_data


def test_both_arms_run_the_same_number_of_trials_and_record_each(tiny_manifest, data_root, tmp_path):
    import classify.stage
    import extract.stage
    import finetune.stage

    config = load_config(overrides=[
        f'extract.backbones=["{TEST_BACKBONE}"]', "extract.views=1", 'extract.tta="none"', 'extract.precision="fp32"',
        "extract.num_workers=0", 'classify.feature_sets=["clean", "aug"]', "classify.fusions=[]", "classify.n_jobs=1",
        "classify.bootstrap=0", 'finetune.policies=["head", "last:1"]', "finetune.ensembles=[]", 'finetune.tta="none"',
        "finetune.batch_size=8", "finetune.num_workers=0", 'finetune.precision="fp32"', "finetune.n_boot=0",
        "fewshot.k=[]", "tune.trials=3", "tune.startup_trials=2", "tune.finetune.epochs={low=1, high=2}",
        "seed=0", "seeds=[]"])
    ctx = StudyContext(config=config, data_root=data_root, out_dir=tmp_path, run_dir=tmp_path / "run", device="cpu")
    ctx.run_dir.mkdir()
    ctx.dataset_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_manifest, ctx.manifest_path)
    for stage in (extract.stage, classify.stage, finetune.stage):
        stage.run(ctx)
    trials = read_trials(ctx.run_dir)
    per_arm = {arm: [t for t in trials if t.arm == arm] for arm in ("head", "finetune")}
    assert {arm: len(ts) for arm, ts in per_arm.items()} == {"head": 3, "finetune": 3}
    for arm, ts in per_arm.items():
        assert [t.number for t in ts] == [0, 1, 2] and all(t.state in ("COMPLETE", "PRUNED") for t in ts)
        assert all(t.seconds > 0 and t.params and t.study for t in ts) and len({t.study for t in ts}) == 1
    assert {p for t in per_arm["head"] for p in t.params} >= {"method", "feature_set", "norm"}
    assert {p for t in per_arm["finetune"] for p in t.params} >= {"policy", "lr", "epochs"}
    rows = read_results(ctx.results_path)
    assert sorted(r.arm for r in rows) == ["finetune", "head"]
    for row in rows:
        chosen = row.selection.best.extra["trial"]
        trial = next(t for t in per_arm[row.arm] if t.number == chosen)
        assert trial.state == "COMPLETE" and trial.val_mean_per_class == row.val_mean_per_class

        def score(t):  # what chose: val, or (heads, 2 val images per class here) the cross-validated score
            return t.cv if t.cv is not None else t.val_mean_per_class
        assert score(trial) == max(score(t) for t in per_arm[row.arm] if t.state == "COMPLETE")
    assert all(t.cv is not None for t in per_arm["head"])  # fewer than 10 val images per class: CV chose
    json.loads((ctx.run_dir / "features.json").read_text())  # the extract stage wrote its index
    assert (tmp_path / "tune" / "journal.log").is_file()  # the trials' storage lives under --out
