"""The classify stage on real Lite0 and Lite1 features of 4 Caltech classes: one searched head per backbone and
split seed, its trials, the head cache, the few-shot curve, reruns and what a change searches again."""
import json
import os
import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import sklearn.pipeline

import classify.search
import classify.stage
from classify.search import point_of
from classify.store import load_head
from dataset.manifest import read_manifest
from extract.store import Store
from study import tune
from study.context import StudyContext
from study.errors import StudyError
from study.protocol import choose_trial, draw_indices, fewshot_backbones
from study.results import REQUIRED_KEYS, read_rows, read_skips, read_trials
from tests.classify_fixtures import (
    EXTRACT_CONFIG,
    small_classify_config,
    small_fewshot_config,
    small_tune_config,
    steady_trial_clock,
    tiny_features,
)
from tests.conftest import TEST_BACKBONE, TEST_BACKBONE2

pytestmark = pytest.mark.needs_data
LITES = (TEST_BACKBONE, TEST_BACKBONE2)  # the tiny test networks: the stage's bookkeeping, not accuracy
TIMINGS = ("train_s", "predict_s", "refit_s", "select_s", "seconds")
CURVE = [(k, d) for k in (1, 3) for d in (0, 1)]  # small_fewshot_config: k = 7 is more than 6 train images
SEARCHES = 1 + len(CURVE)  # a backbone's head search and its few-shot searches


@pytest.fixture(scope="module")
def features(tmp_path_factory, tiny_manifest):
    """{backbone: its feature set} of the two Lites."""
    return {b: tiny_features(tmp_path_factory, tiny_manifest, backbone=b) for b in LITES}


def make_ctx(out, name, *, tiny_manifest, stores, classify_cfg=None, tune_cfg=None, fewshot=None, seed=0,
             seeds=None):
    """A run ``name`` under ``out`` whose features.json lists ``stores`` ({backbone: store entry folder}), the
    classify stage alone (so every backbone draws a few-shot curve)."""
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True)
    config = {"seed": seed, "stages": ["classify"], "classify": classify_cfg or small_classify_config(),
              "tune": tune_cfg or small_tune_config(), "fewshot": fewshot or small_fewshot_config(),
              "finetune": {"backbones": []}, "extract": EXTRACT_CONFIG, **({"seeds": seeds} if seeds else {})}
    ctx = StudyContext(config=config, data_root=out, out_dir=out, run_dir=run_dir, device="cpu")
    if not ctx.manifest_path.is_file():
        ctx.dataset_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_manifest, ctx.manifest_path)
    entries = [{"backbone": b, "store": os.path.relpath(path, out)} for b, path in stores.items()]
    (run_dir / "features.json").write_text(json.dumps(entries))
    return ctx


def run_stage(out, name, *, tiny_manifest, features, **kw):
    ctx = make_ctx(out, name, tiny_manifest=tiny_manifest, stores={b: fs.path for b, fs in features.items()}, **kw)
    classify.stage.run(ctx)
    return ctx, read_rows(ctx.results_path), read_trials(ctx.run_dir)


def rule_choice(trials) -> int:
    """The protocol's choice (study/protocol.py) among a search's trial rows, all complete, by what chose: the val
    score, or the cross-validated one (fewer than 10 val images per class)."""
    return choose_trial([SimpleNamespace(val=t.cv if t.cv is not None else t.val_mean_per_class, seconds=t.seconds,
                                         number=t.number) for t in trials])


def timeless(record: dict) -> dict:
    """The record without wall times, also those its selection's points keep."""
    out = {k: v for k, v in record.items() if k not in TIMINGS}
    if isinstance(out.get("selection"), dict):
        out["selection"] = {**out["selection"], "points": [
            {**p, "extra": timeless(p.get("extra", {}))} for p in out["selection"]["points"]]}
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_manifest, features):
    """Both Lites' searches in this process, every trial one tick of the tuner's clock (exact val ties go to the
    earlier trial, so other runs can be compared with this one whole)."""
    with pytest.MonkeyPatch.context() as mp:
        steady_trial_clock(mp)
        return run_stage(tmp_path_factory.mktemp("classify_out"), "a", tiny_manifest=tiny_manifest,
                         features=features)


@pytest.fixture
def searched(monkeypatch):
    """The backbones whose head search ran (a reused search runs none)."""
    ran = []
    real = classify.search._refit_chosen

    def spy(search, **kwargs):
        ran.append(search.backbone)
        return real(search, **kwargs)
    monkeypatch.setattr(classify.search, "_refit_chosen", spy)
    return ran


def test_one_head_row_per_backbone_and_split_seed_with_the_results_schema(first_run, features):
    _, rows, _ = first_run
    heads = [r for r in rows if r["kind"] == "head"]
    assert [(r["backbone"], r["split_seed"]) for r in heads] == [(b, 0) for b in LITES]
    for r in heads:
        assert set(REQUIRED_KEYS) <= set(r)
        assert r["n_train"] == 24 and r["n_val"] == 8 and r["n_test"] == 16 and r["k_per_class"] is None
        assert r["n_fit_rows"] == (32 if r["feature_set"] == "clean" else 64) and r["fit_on"] == "train+val"
        assert len(r["test_sample_id"]) == len(r["test_pred"]) == 16
        assert r["class_names"] == ["accordion", "anchor", "barrel", "crab"]
        assert r["metrics"]["ci95"]["mean_per_class"] and len(r["metrics"]["confusion"]) == 4
        chosen = r["selection"]["points"][r["selection"]["chosen"]]
        assert (r["method"], r["feature_set"], r["hyperparams"]) == point_of(chosen["params"])
        assert r["val_mean_per_class"] == chosen["val_mean_per_class"]
        assert r["cache_key"] == features[r["backbone"]].key
        assert r["total_params"] is None and r["train_s"] > 0 and r["predict_s"] > 0
        # LR: a weight per feature and class plus intercepts; kNN learns none; an SVM its dual coefficients.
        dim = features[r["backbone"]].features.shape[1]
        expected = {"lr": 4 * dim + 4, "knn": 0}.get(r["method"])
        assert r["trainable_params"] == expected if expected is not None else r["trainable_params"] > 0


def test_trials_jsonl_holds_the_budget_of_each_backbone_and_split_seed_and_the_row_is_its_choice(first_run):
    _, rows, trials = first_run
    assert Counter((t.arm, t.backbone, t.split_seed) for t in trials) == {("head", b, 0): 8 for b in LITES}
    space = tune.parse_space(small_tune_config()["head"], integers=tune.HEAD_INTEGERS)
    for r in (r for r in rows if r["kind"] == "head"):
        own = [t for t in trials if t.backbone == r["backbone"]]
        assert [t.number for t in own] == list(range(8)) and {t.state for t in own} == {"COMPLETE"}
        assert len({t.study for t in own}) == 1 and {t.params["feature_set"] for t in own} <= {"clean", "aug"}
        assert [(t.params, t.val_mean_per_class) for t in own] == [
            (p["params"], p["val_mean_per_class"]) for p in r["selection"]["points"]]
        assert r["selection"]["chosen"] == rule_choice(own)
        assert all(t.at_edge == tuple(k for k, v in t.params.items() if k in space and space[k].at_edge(v))
                   for t in own)
    assert len({t.study for t in trials}) == 2  # a study per backbone


def test_the_head_is_charged_the_stored_rows_its_search_read(first_run, features, tiny_manifest, tmp_path):
    """Like a fine-tune, a head is charged the compute share of the rows it read: a search offered 'clean' and
    'aug' reads every stored view; offered 'clean' alone, the clean (and test-time) views only. A few-shot row is
    a search of its own, offered the same sets, charged those rows of its drawn images, val and test only (as a
    few-shot fine-tune is)."""
    ctx, rows, _ = first_run
    manifest = read_manifest(ctx.manifest_path)
    for r in rows:
        fs = features[r["backbone"]]
        if r["kind"] == "head":
            assert r["feature_s"] == pytest.approx(fs.cost_s(np.ones(len(fs.view), bool)))
            continue
        train = manifest[manifest.split == "train"]
        drawn = train.sample_id.to_numpy()[draw_indices(train.label.to_numpy(), k=r["k_per_class"],
                                                        seed=r["draw_seed"])]
        used = np.isin(np.asarray(fs.sample_id), [*drawn, *manifest[manifest.split != "train"].sample_id])
        assert r["feature_s"] == pytest.approx(fs.cost_s(used))
        assert r["feature_s"] < fs.cost_s(np.ones(len(fs.view), bool))
    lite0 = {LITES[0]: features[LITES[0]]}
    _, clean, _ = run_stage(tmp_path, "clean", tiny_manifest=tiny_manifest, features=lite0,
                            classify_cfg=small_classify_config(feature_sets=["clean"]),
                            fewshot=small_fewshot_config(k=[]))
    (head,) = clean
    fs = lite0[LITES[0]]
    assert head["feature_s"] == pytest.approx(fs.cost_s(fs.view <= 0))
    assert 0 < head["feature_s"] < fs.cost_s(np.ones(len(fs.view), bool))


def test_fewshot_rows_are_searches_of_k_drawn_train_images_per_backbone_and_draw(first_run):
    ctx, rows, trials = first_run
    few = [r for r in rows if r["kind"] == "fewshot"]
    assert sorted((r["backbone"], r["k_per_class"], r["draw_seed"]) for r in few) == [
        (b, k, d) for b in LITES for k, d in CURVE]
    for r in few:
        k = r["k_per_class"]
        assert r["n_train"] == 4 * k and r["n_fit"] == 4 * k and r["fit_on"] == "train" and r["split_seed"] == 0
        assert r["n_val"] == 8 and r["n_test"] == 16
        assert r["n_fit_rows"] == 4 * k * (1 if r["feature_set"] == "clean" else 2)  # view 0 [+ its light view]
        # Its own search of fewshot.trials trials on val, the row its rule's choice.
        points = r["selection"]["points"]
        assert len(points) == 2
        assert r["selection"]["chosen"] == choose_trial([SimpleNamespace(
            val=p["extra"].get("cv", p["val_mean_per_class"]), seconds=p["extra"]["seconds"], number=i)
            for i, p in enumerate(points)])
        chosen = points[r["selection"]["chosen"]]
        assert (r["method"], r["feature_set"], r["hyperparams"]) == point_of(chosen["params"])
    # trials.jsonl holds the full searches' budget: a curve's trials are charged apart (fewshot.trials).
    assert {t.arm for t in trials} == {"head"} and len(trials) == 8 * len(LITES)
    assert [s["what"] for s in read_skips(ctx.run_dir) if "few-shot" in s["what"]] == [
        f"{b} few-shot k=7" for b in LITES]


def test_a_fewshot_draw_of_an_aug_head_brings_each_images_views_and_both_arms_draw_the_same_images(
        features, tiny_manifest):
    from classify.features import head_data
    from classify.fewshot import draw_per_class
    from dataset.manifest import read_manifest

    manifest = read_manifest(tiny_manifest)
    fs = features[LITES[0]]
    aug, clean = (head_data(fs, manifest, feature_set=f).train for f in ("aug", "clean"))
    picked = aug.take(draw_per_class(aug, k=3, seed=5))
    assert len(np.unique(picked.sample_id)) == 12 and len(picked) == 24  # 3 images x 4 classes, view 0 + 1 view
    assert set(clean.take(draw_per_class(clean, k=3, seed=5)).sample_id) == set(picked.sample_id)
    # The fine-tune arm draws from the manifest's train positions in manifest order: the same images.
    train = np.flatnonzero(manifest["split"].to_numpy() == "train")
    ft = manifest["sample_id"].to_numpy()[train[draw_indices(manifest["label"].to_numpy()[train], k=3, seed=5)]]
    assert set(ft) == set(picked.sample_id)
    assert set(clean.take(draw_per_class(clean, k=3, seed=6)).sample_id) != set(picked.sample_id)
    assert not set(picked.sample_id) & set(manifest["sample_id"][manifest["split"] != "train"])


def test_saved_heads_reload_and_reproduce_their_test_predictions(first_run, features):
    ctx, rows, _ = first_run
    for row in (r for r in rows if r["kind"] == "head"):
        fs = features[row["backbone"]]
        model, meta = load_head(ctx.heads_dir / row["head_key"])
        assert meta["cache_key"] == fs.key and meta["hyperparams"] == row["hyperparams"]
        assert (meta["method"], meta["feature_set"], meta["backbone"]) == (row["method"], row["feature_set"],
                                                                           row["backbone"])
        index = {sid: i for i, sid in enumerate(fs.sample_id) if fs.view[i] == 0}
        X = fs.features[[index[s] for s in row["test_sample_id"]]]
        assert model.predict(X).tolist() == row["test_pred"]


def test_a_rerun_reappends_rows_and_trials_without_fitting(first_run, tiny_manifest, features, monkeypatch):
    ctx, rows, trials = first_run

    def refuse(*args, **kwargs):
        raise AssertionError("a cached head was fitted again")
    monkeypatch.setattr(sklearn.pipeline.Pipeline, "fit", refuse)
    monkeypatch.setattr(tune, "run_trials", refuse)
    _, again, again_trials = run_stage(ctx.out_dir, "b", tiny_manifest=tiny_manifest, features=features)
    assert again == rows and again_trials == trials


def _other_bytes(features, folder):
    """A copy of ``features``' store entry with one row changed a little (valid bytes, another content key)."""
    src = Store.open(features.path)
    index = src.index()
    keys = sorted(index.rows)
    data = src.read(keys, index)
    data[0] += 1e-3
    other = Store(folder, src.spec)
    other.create()
    other.write_segment(keys, data, compute_s=1.0)
    return other.dir


def test_other_features_of_one_backbone_search_that_backbone_only(first_run, tiny_manifest, features, searched,
                                                                   monkeypatch):
    ctx, rows, _ = first_run
    steady_trial_clock(monkeypatch)
    stores = {LITES[0]: features[LITES[0]].path, LITES[1]: _other_bytes(features[LITES[1]], ctx.out_dir / "other")}
    changed = make_ctx(ctx.out_dir, "c", tiny_manifest=tiny_manifest, stores=stores)
    classify.stage.run(changed)
    assert Counter(searched) == {LITES[1]: SEARCHES}
    new = {(r["kind"], r["backbone"]): r for r in read_rows(changed.results_path) if r["kind"] == "head"}
    old = {(r["kind"], r["backbone"]): r for r in rows if r["kind"] == "head"}
    assert new[("head", LITES[0])] == old[("head", LITES[0])]
    assert new[("head", LITES[1])]["head_key"] != old[("head", LITES[1])]["head_key"]
    assert Counter(t.backbone for t in read_trials(changed.run_dir)) == {b: 8 for b in LITES}


def test_another_space_searches_again_and_the_curve_follows_the_chosen_head(first_run, tiny_manifest, features,
                                                                            searched, monkeypatch):
    ctx, rows, _ = first_run
    steady_trial_clock(monkeypatch)
    space = {**small_tune_config()["head"], "knn_metric": ["cosine"]}
    # A run setting of the tuner changes no number: every search is reused.
    _, same, _ = run_stage(ctx.out_dir, "d", tiny_manifest=tiny_manifest, features=features,
                           tune_cfg=small_tune_config(stale_after_s=60.0))
    assert searched == [] and same == rows
    _, new, _ = run_stage(ctx.out_dir, "e", tiny_manifest=tiny_manifest, features=features,
                          tune_cfg=small_tune_config(head=space))
    assert Counter(searched) == {b: SEARCHES for b in LITES}  # every search reads the space, few-shot too
    assert all(t.params.get("knn_metric", "cosine") == "cosine" for t in read_trials(ctx.out_dir / "runs" / "e"))
    few_now = [r for r in new if r["kind"] == "fewshot"]
    assert len(few_now) == len(CURVE) * len(LITES)
    assert all(p["params"].get("knn_metric", "cosine") == "cosine" for r in few_now for p in r["selection"]["points"])


def test_rows_are_deterministic_apart_from_wall_time(first_run, tiny_manifest, features, tmp_path, monkeypatch):
    """A fresh search in this process gives the first run's rows and trials (with the same trial clock)."""
    _, rows, trials = first_run
    steady_trial_clock(monkeypatch)
    _, again, again_trials = run_stage(tmp_path, "f", tiny_manifest=tiny_manifest, features=features)
    assert [timeless(r) for r in again] == [timeless(r) for r in rows]
    assert [timeless(t.to_dict()) for t in again_trials] == [timeless(t.to_dict()) for t in trials]


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_parallel_workers_give_the_trials_and_rows_of_one_process(first_run, tiny_manifest, features, tmp_path):
    """Two worker processes, one search each, try what one process tried, score it alike and choose alike."""
    _, rows, trials = first_run
    _, par, par_trials = run_stage(tmp_path, "g", tiny_manifest=tiny_manifest, features=features,
                                   classify_cfg=small_classify_config(n_jobs=2), fewshot=small_fewshot_config(k=[]))
    assert [timeless(t.to_dict()) for t in par_trials] == [timeless(t.to_dict()) for t in trials]
    one = {r["backbone"]: r for r in rows if r["kind"] == "head"}
    assert [r["backbone"] for r in par] == list(LITES)
    for r in par:
        own = [t for t in par_trials if t.backbone == r["backbone"]]
        assert r["selection"]["chosen"] == rule_choice(own)
        assert timeless(r) == timeless(one[r["backbone"]])


@pytest.mark.parametrize("seeds", [[0, 3], [3, 0]])
def test_split_seeds_first_draws_the_fewshot_curve_on_the_first_split_seed_only(first_run, tiny_manifest, features,
                                                                                 seeds, searched):
    ctx, rows, _ = first_run
    _, new, _ = run_stage(ctx.out_dir, f"seeds-{seeds[0]}", tiny_manifest=tiny_manifest, features=features,
                          fewshot=small_fewshot_config(split_seeds="first"), seeds=seeds)
    assert searched == []  # the heads and the curve were reused
    few = [r for r in new if r["kind"] == "fewshot"]
    # Split seed 0 is first in [0, 3]: its curve (cached under a key without split_seeds) is the first run's.
    assert few == ([r for r in rows if r["kind"] == "fewshot"] if seeds[0] == 0 else [])
    assert [r for r in new if r["kind"] == "head"] == [r for r in rows if r["kind"] == "head"]


def test_another_split_seed_is_a_search_of_its_own(first_run, tiny_manifest, features, searched):
    ctx, rows, _ = first_run
    _, new, trials = run_stage(ctx.out_dir, "seed-3", tiny_manifest=tiny_manifest, features=features,
                               fewshot=small_fewshot_config(split_seeds="first"), seed=3, seeds=[0, 3])
    assert searched == list(LITES) and [(r["backbone"], r["split_seed"]) for r in new] == [(b, 3) for b in LITES]
    assert Counter((t.backbone, t.split_seed) for t in trials) == {(b, 3): 8 for b in LITES}
    assert not {t.study for t in trials} & {t.study for t in first_run[2]}


def test_missing_features_index_says_to_run_extract(tmp_path):
    ctx = StudyContext(config={"seed": 0, "classify": small_classify_config(), "tune": small_tune_config(),
                               "extract": EXTRACT_CONFIG},
                       data_root=tmp_path, out_dir=tmp_path, run_dir=tmp_path / "run", device="cpu")
    with pytest.raises(StudyError, match="run the extract stage"):
        classify.stage.run(ctx)


def test_features_from_another_manifest_are_refused(features, tiny_manifest):
    import pandas as pd

    from classify.features import head_data
    manifest = pd.read_csv(tiny_manifest)
    fs = features[LITES[0]]
    with pytest.raises(ValueError, match="not in the manifest"):
        head_data(fs, manifest.iloc[1:], feature_set="clean")
    relabelled = manifest.assign(label=np.roll(manifest["label"].to_numpy(), 1))
    with pytest.raises(ValueError, match="labels disagree"):
        head_data(fs, relabelled, feature_set="clean")


def test_both_arms_draw_curves_for_the_fine_tuned_backbones_only_when_the_fine_tune_runs():
    available = ["efficientnet_lite0", "efficientnet_lite2"]
    config = {"stages": ["classify", "finetune"], "finetune": {"backbones": ["efficientnet_lite0", "resnet50"]}}
    assert fewshot_backbones(config, available) == ["efficientnet_lite0"]
    assert fewshot_backbones({**config, "finetune": {"backbones": []}}, available) == available  # [] = all tuned
    assert fewshot_backbones({**config, "stages": ["classify"]}, available) == available  # no other arm to match
    assert fewshot_backbones({**config, "finetune": {"backbones": ["resnet50"]}}, available) == []
