"""The classify stage on real Lite0 features of 4 Caltech classes: rows, head cache, few-shot, reruns."""
import json
import os
import shutil

import numpy as np
import pytest

import classify.selection
import classify.stage
from classify.store import load_head
from study.context import StudyContext
from study.errors import StudyError
from study.results import REQUIRED_KEYS, read_rows, read_skips, val_best
from tests.classify_fixtures import EXTRACT_CONFIG, SMALL_CONFIG, small_classify_config, tiny_lite0_features

pytestmark = pytest.mark.needs_data


@pytest.fixture(scope="module")
def features(tmp_path_factory, tiny_manifest):
    return tiny_lite0_features(tmp_path_factory, tiny_manifest)


def make_ctx(out, name, *, tiny_manifest, features, classify_cfg, seeds=None):
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True)
    config = {"seed": 0, "classify": classify_cfg, "extract": EXTRACT_CONFIG, **({"seeds": seeds} if seeds else {})}
    ctx = StudyContext(config=config, data_root=out,
                       out_dir=out, run_dir=run_dir, device="cpu")
    if not ctx.manifest_path.is_file():
        ctx.dataset_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_manifest, ctx.manifest_path)
    entry = {"backbone": "efficientnet_lite0", "store": os.path.relpath(features.path, out)}
    (run_dir / "features.json").write_text(json.dumps([entry]))
    return ctx


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_manifest, features):
    out = tmp_path_factory.mktemp("classify_out")
    # Two worker processes: the reruns below fit in this process (n_jobs=1) and must find the same rows.
    ctx = make_ctx(out, "a", tiny_manifest=tiny_manifest, features=features,
                   classify_cfg=small_classify_config(n_jobs=2))
    classify.stage.run(ctx)
    return ctx, read_rows(ctx.results_path)


def test_head_rows_follow_the_results_schema(first_run, features):
    ctx, rows = first_run
    heads = [r for r in rows if r["kind"] == "head"]
    assert sorted((r["method"], r["feature_set"]) for r in heads) == sorted(
        (m, f) for m in ("lr", "svm", "knn") for f in ("clean", "aug"))
    for r in heads:
        assert set(REQUIRED_KEYS) <= set(r)
        assert r["n_train"] == 24 and r["n_val"] == 8 and r["n_test"] == 16 and r["k_per_class"] is None
        assert r["n_fit_rows"] == (32 if r["feature_set"] == "clean" else 64)
        assert len(r["test_sample_id"]) == len(r["test_pred"]) == 16
        assert r["class_names"] == ["accordion", "anchor", "barrel", "crab"]
        assert r["metrics"]["ci95"]["mean_per_class"] and len(r["metrics"]["confusion"]) == 4
        assert r["hyperparams"] in [s["params"] for s in r["selection"]["points"]]
        assert r["cache_key"] == features.key
        assert r["total_params"] is None and r["train_s"] > 0 and r["predict_s"] > 0
    lr = next(r for r in heads if r["method"] == "lr")
    assert lr["trainable_params"] == 4 * 1280 + 4


def test_each_head_is_charged_the_stored_rows_it_read(first_run, features):
    """Like a fine-tune, a head is charged the compute share of the rows it read: 'aug' reads the augmented
    views too, 'clean' only the clean (and test-time) views."""
    _, rows = first_run
    cost = {r["feature_set"]: r["feature_s"] for r in rows if r["kind"] == "head" and r["method"] == "lr"}
    assert cost["clean"] == pytest.approx(features.cost_s(features.view <= 0))
    assert cost["aug"] == pytest.approx(features.cost_s(np.ones(len(features.view), bool)))
    assert 0 < cost["clean"] < cost["aug"]


def test_fewshot_rows_are_the_val_chosen_heads_with_k_draws_and_counts(first_run):
    ctx, rows = first_run
    few = [r for r in rows if r["kind"] == "fewshot"]
    chosen = val_best([r for r in rows if r["kind"] == "head"])
    # k = 1, 3, 8 fit (8 images per class in train+val), 2 seeds each; k = 9 is a recorded skip.
    assert sorted((r["k_per_class"], r["draw_seed"]) for r in few) == [(k, s) for k in (1, 3, 8) for s in (0, 1)]
    for r in few:
        assert r["n_train"] == 4 * r["k_per_class"] and r["n_test"] == 16
        assert (r["method"], r["feature_set"], r["hyperparams"]) == (
            chosen["method"], chosen["feature_set"], chosen["hyperparams"])
    draws = {r["draw_seed"]: r["test_pred"] for r in few if r["k_per_class"] == 1}
    assert len(draws) == 2
    assert any("k=9" in s["what"] for s in read_skips(ctx.run_dir))


def test_a_fewshot_draw_of_an_aug_head_brings_each_images_views_and_both_arms_draw_the_same_images(
        features, tiny_manifest):
    from classify.features import head_data
    from classify.fewshot import draw_indices, draw_per_class, fewshot_pool
    from dataset.manifest import read_manifest

    manifest = read_manifest(tiny_manifest)
    aug, clean = (fewshot_pool(head_data(features, manifest, feature_set=f), pool="train+val")
                  for f in ("aug", "clean"))
    picked = aug.take(draw_per_class(aug, k=3, seed=5))
    assert len(np.unique(picked.sample_id)) == 12 and len(picked) == 24  # 3 images x 4 classes, view 0 + 1 view
    assert set(clean.take(draw_per_class(clean, k=3, seed=5)).sample_id) == set(picked.sample_id)
    # The fine-tune arm draws from the manifest's train+val positions in manifest order: the same images.
    split = manifest["split"].to_numpy()
    positions = np.concatenate([np.flatnonzero(split == "train"), np.flatnonzero(split == "val")])
    ft = manifest["sample_id"].to_numpy()[positions[draw_indices(manifest["label"].to_numpy()[positions], k=3, seed=5)]]
    assert set(ft) == set(picked.sample_id)
    assert set(clean.take(draw_per_class(clean, k=3, seed=6)).sample_id) != set(picked.sample_id)


def test_saved_head_reloads_and_reproduces_its_test_predictions(first_run, features, tiny_manifest):
    ctx, rows = first_run
    row = next(r for r in rows if r["method"] == "svm" and r["feature_set"] == "aug")
    model, meta = load_head(ctx.heads_dir / row["head_key"])
    assert meta["cache_key"] == features.key and meta["hyperparams"] == row["hyperparams"]
    index = {sid: i for i, sid in enumerate(features.sample_id) if features.view[i] == 0}
    X = features.features[[index[s] for s in row["test_sample_id"]]]
    assert model.predict(X).tolist() == row["test_pred"]


def test_rerun_reappends_rows_without_fitting(first_run, tiny_manifest, features, monkeypatch):
    ctx, rows = first_run

    def refuse(*args, **kwargs):
        raise AssertionError("a cached head was fitted again")
    monkeypatch.setattr(classify.selection, "select_and_refit", refuse)
    monkeypatch.setattr(classify.stage, "fit_fewshot", refuse)
    again = make_ctx(ctx.out_dir, "b", tiny_manifest=tiny_manifest, features=features,
                     classify_cfg=small_classify_config())
    classify.stage.run(again)
    assert read_rows(again.results_path) == rows


def test_changing_one_heads_settings_refits_only_that_head(first_run, tiny_manifest, features, monkeypatch):
    ctx, rows = first_run
    fitted = []
    original = classify.selection.select_and_refit

    def counting(method, *args, **kwargs):
        fitted.append(method)
        return original(method, *args, **kwargs)
    monkeypatch.setattr(classify.selection, "select_and_refit", counting)
    cfg = small_classify_config(knn={"k": [1, 5], "metric": ["cosine"], "weights": ["uniform"], "norm": ["l2"]})
    changed = make_ctx(ctx.out_dir, "c", tiny_manifest=tiny_manifest, features=features, classify_cfg=cfg)
    classify.stage.run(changed)
    assert fitted == ["knn", "knn"]  # clean and aug
    new = read_rows(changed.results_path)
    same = lambda r: (r["method"], r["feature_set"], r["kind"], r["k_per_class"], r["draw_seed"])  # noqa: E731
    old = {same(r): r for r in rows}
    for r in new:
        if r["kind"] == "head":
            assert (r == old[same(r)]) == (r["method"] != "knn")
    # The few-shot curve is the val-chosen head's: refit when (and only when) that head changed.
    chosen_before = val_best([r for r in rows if r["kind"] == "head"])
    chosen_now = val_best([r for r in new if r["kind"] == "head"])
    few_now = [r for r in new if r["kind"] == "fewshot"]
    assert all(r["method"] == chosen_now["method"] for r in few_now)
    assert (few_now == [r for r in rows if r["kind"] == "fewshot"]) == (chosen_now == chosen_before)


def test_rows_are_deterministic_apart_from_wall_time(first_run, tiny_manifest, features, tmp_path):
    """A fresh fit in this process gives the rows two worker processes gave (in the same order)."""
    _, rows = first_run
    ctx = make_ctx(tmp_path, "d", tiny_manifest=tiny_manifest, features=features, classify_cfg=small_classify_config())
    classify.stage.run(ctx)
    timeless = lambda r: {k: v for k, v in r.items() if k not in ("train_s", "predict_s")}  # noqa: E731
    assert [timeless(r) for r in read_rows(ctx.results_path)] == [timeless(r) for r in rows]


@pytest.mark.parametrize("seeds", [[0, 3], [3, 0]])
def test_split_seeds_first_draws_the_fewshot_curve_on_the_first_split_seed_only(first_run, tiny_manifest, features,
                                                                                 seeds, monkeypatch):
    ctx, rows = first_run
    monkeypatch.setattr(classify.stage, "fit_fewshot", lambda *a, **k: pytest.fail("the curve was not reused"))
    cfg = small_classify_config(fewshot={**SMALL_CONFIG["fewshot"], "split_seeds": "first"})
    run = make_ctx(ctx.out_dir, f"seeds-{seeds[0]}", tiny_manifest=tiny_manifest, features=features, classify_cfg=cfg,
                   seeds=seeds)
    classify.stage.run(run)
    few = [r for r in read_rows(run.results_path) if r["kind"] == "fewshot"]
    # Split seed 0 is first in [0, 3]: its curve (cached under a key without split_seeds) is the first run's.
    assert few == ([r for r in rows if r["kind"] == "fewshot"] if seeds[0] == 0 else [])
    assert len([r for r in read_rows(run.results_path) if r["kind"] == "head"]) == 6


def test_missing_features_index_says_to_run_extract(tmp_path):
    ctx = StudyContext(config={"seed": 0, "classify": small_classify_config(), "extract": EXTRACT_CONFIG},
                       data_root=tmp_path, out_dir=tmp_path, run_dir=tmp_path / "run", device="cpu")
    with pytest.raises(StudyError, match="run the extract stage"):
        classify.stage.run(ctx)


def test_features_from_another_manifest_are_refused(features, tiny_manifest):
    import pandas as pd

    from classify.features import head_data
    manifest = pd.read_csv(tiny_manifest)
    with pytest.raises(ValueError, match="not in the manifest"):
        head_data(features, manifest.iloc[1:], feature_set="clean")
    relabelled = manifest.assign(label=np.roll(manifest["label"].to_numpy(), 1))
    with pytest.raises(ValueError, match="labels disagree"):
        head_data(features, relabelled, feature_set="clean")


def test_fewshot_head_is_chosen_among_the_fine_tuned_backbones_when_the_arms_differ():
    from types import SimpleNamespace

    from classify.fewshot import like_for_like

    rows = [SimpleNamespace(backbone=b) for b in ("efficientnet_lite0", "efficientnet_lite2", "fused:efficientnet_lite0+efficientnet_lite2",
                                      "fused:efficientnet_lite0+efficientnet_lite1")]
    config = {"stages": ["classify", "finetune"], "finetune": {"backbones": ["efficientnet_lite0", "efficientnet_lite1"]}}
    assert [r.backbone for r in like_for_like(rows, config)] == [
        "efficientnet_lite0", "fused:efficientnet_lite0+efficientnet_lite1"]
    assert like_for_like(rows, {**config, "finetune": {"backbones": []}}) == rows  # [] = every backbone fine-tuned
    assert like_for_like(rows, {**config, "stages": ["classify"]}) == rows  # no fine-tune arm to match
    assert like_for_like(rows, {**config, "finetune": {"backbones": ["resnet50"]}}) == rows  # none left: all
