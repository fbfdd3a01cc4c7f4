"""Both arms' few-shot curves, like for like (the tiny test network, the tiny 4-class manifest, fp32): per backbone,
the same k
train images per class for both arms at every (k, draw), each (arm, k, draw) choosing its settings on val with the
same small budget, refit on the draw alone; a k the classes cannot give is a recorded skip; a rerun trains nothing."""
from __future__ import annotations

import numpy as np
import pytest

from classify.fewshot import drawn
from classify.stage import head_search
from dataset.manifest import read_manifest
from extract.engine import PassSettings
from finetune import train as train_mod
from finetune.fewshot import run_fewshot
from finetune.inputs import StoreAccess
from finetune.search import drawn_positions
from pipeline.config import load_config
from study.results import check_row, read_skips
from tests.classify_fixtures import tiny_lite0_features
from tests.conftest import TEST_BACKBONE
from tests.finetune_fixtures import recipe, tune_config

pytestmark = pytest.mark.needs_data


@pytest.fixture(scope="module")
def setup(tiny_backbone, tiny_manifest, data_root, tmp_path_factory):
    hp = recipe()
    hp.update(views=1, batch_size=8, n_boot=20, num_workers=0, warmup_epochs=1, precision="fp32", tta="none",
              policies=["head", "last:1"])
    root = tmp_path_factory.mktemp("few")
    store = StoreAccess(root=root / "store",
                        settings=PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False))
    config = load_config(overrides=["fewshot.k=[1, 3, 7]", "fewshot.draws=2", "fewshot.trials=2", "seed=0",
                                    "seeds=[]"])
    common = dict(backbone=tiny_backbone, config=config, manifest_path=tiny_manifest, run_dir=root / "run",
                  data_root=data_root, hp=hp, tune_cfg=tune_config(finetune={"lr": [3e-3, 1e-2]}),
                  tune_dir=root / "tune", seed=0, device="cpu", finetune_dir=root / "finetune", store=store)
    (root / "run").mkdir()
    return common, run_fewshot(**common)


def test_both_arms_draw_the_same_train_images(tiny_manifest, tmp_path_factory):
    manifest = read_manifest(tiny_manifest)
    features = tiny_lite0_features(tmp_path_factory, tiny_manifest)
    cfg = load_config(overrides=['classify.feature_sets=["clean", "aug"]'])["classify"]
    search = head_search({"clean": features, "aug": features}, backbone="efficientnet_lite0", manifest=manifest,
                         cfg=cfg, seed=0, run_dir=tmp_path_factory.mktemp("skips"))
    train = np.flatnonzero(manifest["split"].to_numpy() == "train")
    ids = manifest["sample_id"].to_numpy()
    for k, draw in ((1, 0), (3, 0), (3, 1), (6, 2)):
        ft = set(ids[drawn_positions(manifest, train, k=k, draw=draw)])
        heads = drawn(search, k=k, draw=draw)
        for name, data in heads.data.items():
            assert set(data.train.sample_id) == ft, (k, draw, name)  # aug: the same images, with their views
            assert len(data.val_fit) == 0 and np.array_equal(data.val.X, search.data[name].val.X)
        assert len(ft) == 4 * k and not ft & set(ids[manifest["split"].to_numpy() != "train"])
    a, b = (set(ids[drawn_positions(manifest, train, k=2, draw=d)]) for d in (0, 1))
    assert a != b  # another draw seed, other images


def test_each_k_and_draw_is_searched_on_val_and_refit_on_the_draw_alone(setup):
    common, rows = setup
    assert sorted((r.k_per_class, r.draw_seed) for r in rows) == [(1, 0), (1, 1), (3, 0), (3, 1)]
    for r in rows:
        check_row(r)
        assert (r.kind, r.arm, r.split_seed, r.fit_on) == ("fewshot", "finetune", 0, "train")
        assert r.n_train == r.n_fit == 4 * r.k_per_class and r.n_test == 16 and r.n_val == 8
        assert r.selection is not None and len(r.selection.points) <= 2 and r.val_mean_per_class is not None
        assert r.selection.best.params["policy"] in ("head", "last:1")
    skip, = read_skips(common["run_dir"])
    assert skip["what"] == f"{TEST_BACKBONE} few-shot k=7" and "lower fewshot.k to at most 6" in skip["fix"]


def test_a_rerun_reappends_the_curve_without_training(setup, monkeypatch):
    common, first = setup

    def refuse(*a, **k):
        raise AssertionError("a cached few-shot search was trained again")
    monkeypatch.setattr(train_mod.Trainer, "train_epoch", refuse)
    assert run_fewshot(**common) == first



def test_a_draws_fit_is_keyed_by_its_images_on_the_naive_path(tiny_manifest, data_root, tmp_path):
    """A fit on k drawn images never shares a key (and so a checkpoint) with the full-train fit or another draw's
    on the naive path (policy 'all', or prefix_cache off), which reads no store rows to key by (the cached path's
    key is the identity of the store rows its positions read)."""
    from finetune.experiment import _Experiment
    from finetune.inputs import FitInputs

    manifest = read_manifest(tiny_manifest)
    hp = {**recipe(), "views": 1, "prefix_cache": False}
    point = {"lr": 3e-3}

    def spec(train=None) -> dict:
        rows = FitInputs(backbone=None, manifest=manifest, hp=hp, data_root=data_root, stores={}, view_seed=0)
        rows.cached = lambda policy: False  # no store here: the key must come from the images themselves
        if train is not None:
            rows.restrict_train(train)
        exp = _Experiment(backbone=None, manifest=manifest, hp=hp, seed=0, device="cpu",
                          finetune_dir=tmp_path / "ft", rows=rows, base={"seed": 0}, on_epoch_end=None)
        return exp.fit_spec(policy="all", params=point, fit_on="train", epochs=None, init=None)

    full = FitInputs(backbone=None, manifest=manifest, hp=hp, data_root=data_root, stores={}, view_seed=0)
    train = full.positions["train"]
    draws = [drawn_positions(manifest, train, k=1, draw=d) for d in (0, 1)]
    assert not np.array_equal(*draws)
    keys = [spec(), spec(draws[0]), spec(draws[1]), spec(draws[0])]
    assert keys[0] != keys[1] != keys[2] and keys[1] == keys[3]  # the same draw is the same fit
