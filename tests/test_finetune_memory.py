"""Memory is bounded by one fine-tune's working set: nothing keeps a finished fine-tune's activations alive.

Three fine-tune searches (two trials each) run in one process (the tiny 4-class manifest, the tiny test network, one
epoch, fp32); every
activation tensor a run reads from the store is watched through a weak reference, and each run's are gone
once it has returned — before the next one starts — so a study's memory does not grow with its fine-tunes."""
from __future__ import annotations

import gc
import weakref

import pytest

from extract.engine import PassSettings
from finetune import train as train_mod
from finetune.inputs import StoreAccess
from tests.finetune_fixtures import recipe, search, tune_config

pytestmark = pytest.mark.needs_data


def test_three_fine_tunes_in_one_process_free_their_activations(tiny_backbone, tiny_manifest, data_root, tmp_path,
                                                                monkeypatch):
    hp = recipe()
    hp.update(views=1, batch_size=8, n_boot=0, num_workers=0, warmup_epochs=0, precision="fp32")
    store = StoreAccess(root=tmp_path / "store",
                        settings=PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False))
    watched: list[list[weakref.ref]] = []
    real_init = train_mod.CachedSource.__init__

    def watch(source, acts, labels, **kw):
        real_init(source, acts, labels, **kw)
        watched[-1].append(weakref.ref(acts))

    monkeypatch.setattr(train_mod.CachedSource, "__init__", watch)
    for policy in ("head", "last:1", "probe+last:1"):
        watched.append([])
        (row,) = search(backbone=tiny_backbone, policies=policy, manifest_path=tiny_manifest, data_root=data_root,
                        hp=hp,
                        seed=0, device="cpu", finetune_dir=tmp_path / "ft", store=store,
                        tune_cfg=tune_config(trials=2, finetune={"epochs": [1], "lr": [3e-3, 1e-2]})).rows
        assert row.method == f"ft:{policy}"
        gc.collect()
        assert watched[-1], f"{policy} read no activations from the store"
        alive = [ref for run in watched for ref in run if ref() is not None]
        assert not alive, f"after {policy}: {len(alive)} activation tensors of finished fine-tunes are still alive"

