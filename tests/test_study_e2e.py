"""The whole study, end to end, offline: configs/quick.toml on the real data, run twice."""
import json
import time

import pytest

import run_study
from study.results import read_rows, read_trials
from tests.report_checks import assert_comparison_traces, assert_pngs_valid

pytestmark = [pytest.mark.slow]


def _only_run(out):
    runs = sorted((out / "runs").iterdir())
    return runs[-1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("quick")
    args = ["--config", "configs/quick.toml", "--data-root", str(data_root), "--out", str(out)]
    t0 = time.perf_counter()
    assert run_study.main(args) == 0
    first_s = time.perf_counter() - t0
    first = _only_run(out)
    with pytest.MonkeyPatch.context() as mp:
        # A cache hit must not load the pretrained model, run a forward, fit a head, read prefix activations
        # or train: make all impossible.
        import classify.search
        import extract.engine
        import extract.read
        import finetune.experiment

        def refuse(*a, **k):
            raise AssertionError("second run did work that the cache should have saved")
        mp.setattr(extract.engine, "load_backbone", refuse)
        mp.setattr(extract.engine, "PassRunner", refuse)
        mp.setattr(classify.search, "make_pipeline", refuse)
        mp.setattr(extract.read.EntryReader, "tensor", refuse)
        mp.setattr(finetune.experiment, "Trainer", refuse)
        t0 = time.perf_counter()
        assert run_study.main(args) == 0
        second_s = time.perf_counter() - t0
    second = _only_run(out)
    print(f"\nquick study: first run {first_s:.1f}s, second run {second_s:.1f}s, "
          f"ratio {first_s / max(second_s, 1e-9):.1f}x")
    return first, second


def test_quick_study_writes_a_traceable_report(two_runs):
    first, _ = two_runs
    rows = read_rows(first / "results.jsonl")
    kinds = {r["kind"] for r in rows}
    assert {"head", "finetune", "fewshot"} <= kinds
    # One head search per (backbone, split seed); its trials tried every head.
    assert sorted((r["backbone"], r["split_seed"]) for r in rows if r["kind"] == "head") == [
        ("efficientnet_lite0", s) for s in (0, 1, 2)]
    trials = read_trials(first)
    assert {t.params["method"] for t in trials if t.arm == "head"} == {"lr", "svm", "knn"}
    assert len([t for t in trials if t.arm == "head"]) == 3 * 6  # quick.toml: tune.trials = 6 per split seed
    assert assert_comparison_traces(first) >= 4
    assert_pngs_valid(first)
    for name in ("config.resolved.toml", "provenance.json", "results.csv", "per_class.csv"):
        assert (first / name).is_file(), name
    # Three split seeds over one store: every seed's heads and fine-tunes, and each (image, view) stored once.
    assert {r["split_seed"] for r in rows if r["kind"] != "fewshot"} == {0, 1, 2}
    from dataset.manifest import read_manifest
    from dataset.views import study_requests
    from extract.engine import store_keys
    from extract.store import Store

    out = first.parent.parent
    wanted = set()
    for seed in (0, 1, 2):
        manifest = read_manifest(out / "dataset" / f"seed-{seed}" / "manifest.csv")
        wanted |= set(store_keys(manifest, study_requests(manifest, views=2, tta="hflip"), policy="light",
                                 view_seed=0))
    (entry,) = json.loads((first / "features.json").read_text())
    pooled = Store.open(out / entry["store"])
    assert set(pooled.index().rows) == wanted and sum(pooled.index().sizes.values()) == len(wanted)
    prov = json.loads((first / "provenance.json").read_text())
    assert prov["status"] == "ok" and prov["git"]["sha"] and prov["ended"]


def test_second_run_is_a_cache_hit_with_identical_results(two_runs):
    first, second = two_runs
    a, b = read_rows(first / "results.jsonl"), read_rows(second / "results.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("run",)} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    assert (second / "report.md").is_file()
