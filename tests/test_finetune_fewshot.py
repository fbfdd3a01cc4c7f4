"""The fine-tune arm's few-shot curve: the chosen recipe retrained on the head arm's k-shot draws, for the
chosen refit's number of optimizer steps, cached (real Lite0, the tiny 4-class manifest, fp32)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from classify.fewshot import draw_indices
from dataset.manifest import read_manifest
from extract.engine import PassSettings
from finetune import train as train_mod
from finetune.fewshot import chosen_recipe, run_fewshot, scaled_schedule
from finetune.inputs import FitInputs, StoreAccess
from study.results import check_row
from tests.finetune_fixtures import recipe, search, tune_config

pytestmark = pytest.mark.needs_data


def test_the_schedule_keeps_the_refits_optimizer_steps():
    hp = {"epochs": 15, "warmup_epochs": 1, "batch_size": 32}
    overrides, epochs = scaled_schedule(hp, refit_epochs=6, n_full=3810, n_k=127)
    assert overrides == {"epochs": 450, "warmup_epochs": 30} and epochs == 180  # 120 vs 4 steps an epoch: x 30
    # Steps, not images: 129 images are 5 batches of 32, so 3810 images' 120 steps are 24 epochs of them.
    overrides, epochs = scaled_schedule(hp, refit_epochs=6, n_full=3810, n_k=129)
    assert overrides == {"epochs": 360, "warmup_epochs": 24} and epochs == 144
    assert scaled_schedule(hp, refit_epochs=6, n_full=100, n_k=100) == ({"epochs": 15, "warmup_epochs": 1}, 6)


@pytest.fixture(scope="module")
def setup(lite0, tiny_manifest, data_root, tmp_path_factory):
    hp = recipe()
    hp.update(views=1, batch_size=8, n_boot=20, num_workers=0, warmup_epochs=1, precision="fp32")
    store = StoreAccess(root=tmp_path_factory.mktemp("store"),
                        settings=PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False))
    finetune_dir = tmp_path_factory.mktemp("ft")
    (row,) = search(backbone=lite0, policies="last:1", manifest_path=tiny_manifest, data_root=data_root, hp=hp,
                    seed=0, device="cpu", finetune_dir=finetune_dir, store=store,
                    tune_cfg=tune_config(trials=2, finetune={"lr": [3e-3, 1e-2]})).rows
    return hp, store, finetune_dir, row


def _fewshot(lite0, setup, tiny_manifest, data_root):
    hp, store, finetune_dir, row = setup
    return run_fewshot(backbone=lite0, row=row, manifest_path=tiny_manifest, data_root=data_root, hp=hp, seed=0,
                       device="cpu", finetune_dir=finetune_dir, store=store, ks=[1, 3, 8, 9], draws=2,
                       pool="train+val")


def test_fewshot_retrains_the_chosen_recipe_on_the_head_arms_draws(lite0, setup, tiny_manifest, data_root,
                                                                    monkeypatch):
    hp, _, _, row = setup
    parts = {}
    real_add = FitInputs.add_train_part
    monkeypatch.setattr(FitInputs, "add_train_part",
                        lambda self, name, pos: (parts.__setitem__(name, pos), real_add(self, name, pos))[1])
    rows = _fewshot(lite0, setup, tiny_manifest, data_root)
    # k = 9 exceeds the 8 train+val images per class: skipped, never a crash; k = 8 takes the whole pool: the
    # chosen refit's own row is the point, once.
    assert sorted((r.k_per_class, r.draw_seed) for r in rows) == [(1, 0), (1, 1), (3, 0), (3, 1), (8, 0)]
    whole = rows.pop()
    assert whole.test_pred == row.test_pred and whole.metrics == row.metrics and whole.n_train == 32
    check_row(whole)
    policy, point, refit = chosen_recipe(row)
    manifest = read_manifest(tiny_manifest)
    split = manifest["split"].to_numpy()
    trainval = np.concatenate([np.flatnonzero(split == "train"), np.flatnonzero(split == "val")])
    for r in rows:
        check_row(r)
        assert (r.kind, r.method, r.split_seed, r.n_train, r.n_test) == (
            "fewshot", "ft:last:1", 0, 4 * r.k_per_class, 16)
        assert {k: r.hyperparams[k] for k in point} == point
        # The refit's steps: refit epochs x (32 train+val images / 4k), capped by the stretched schedule.
        factor = math.ceil(32 / hp["batch_size"]) / math.ceil(4 * r.k_per_class / hp["batch_size"])
        expected = min(math.ceil(refit[0] * factor), math.ceil(point["epochs"] * factor))
        assert r.hyperparams["trained_epochs"] == [expected]
        # The images trained on are the ones the head arm draws with the same seed from the same pool.
        (drawn,) = [pos for name, pos in parts.items()
                    if name.startswith(f"fewshot:train+val:{r.k_per_class}:{r.draw_seed}:")]
        want = trainval[draw_indices(manifest["label"].to_numpy()[trainval], k=r.k_per_class, seed=r.draw_seed)]
        assert np.array_equal(drawn, want)
    draws = {r.draw_seed: r.test_pred for r in rows if r.k_per_class == 1}
    assert len(draws) == 2


def test_a_rerun_reappends_the_curve_without_training(lite0, setup, tiny_manifest, data_root, monkeypatch):
    first = _fewshot(lite0, setup, tiny_manifest, data_root)

    def refuse(*a, **k):
        raise AssertionError("a cached few-shot curve was trained again")
    monkeypatch.setattr(train_mod.Trainer, "fit_fixed", refuse)
    monkeypatch.setattr(train_mod.Trainer, "predict", refuse)
    assert _fewshot(lite0, setup, tiny_manifest, data_root) == first
