"""Shared helpers for the classify tests: real Lite features of the tiny manifest, a small head config and budget."""
from __future__ import annotations

import time
from types import SimpleNamespace

from classify.config import SCHEMA
from study.schema import validate
from study.tune import SCHEMA as TUNE_SCHEMA

# One process (n_jobs=1), so that a test's monkeypatch reaches the fitting code; tests of the parallel path
# ask for more.
SMALL_CONFIG = {
    "bootstrap": 50,
    "n_jobs": 1,
    "lr": {"max_iter": 200},
}
# The tiny manifest has 6 train images per class: k = 7 is a recorded skip. Two trials a draw keep it quick.
SMALL_FEWSHOT = {"k": [1, 3, 7], "draws": 2, "trials": 2}
# A search of every head over a few seconds on 4 classes. Random search draws each trial's setting from
# (seed, trial number) alone, so a worker process draws what one process draws. The RBF kernel and a k range
# that ends near the 24 training rows make every pipeline branch reachable.
SMALL_TUNE = {
    "trials": 8,
    "sampler": "random",
    "seed": 0,
    "head": {"svm_kernel": ["linear", "rbf"], "knn_k": {"low": 1, "high": 16, "log": True}},
}


def small_classify_config(**changes) -> dict:
    return validate({**SMALL_CONFIG, **changes}, SCHEMA, prefix="classify")


def small_tune_config(**changes) -> dict:
    return validate({**SMALL_TUNE, **changes}, TUNE_SCHEMA, prefix="tune")


def small_fewshot_config(**changes) -> dict:
    from study.protocol import FEWSHOT_SCHEMA

    return validate({**SMALL_FEWSHOT, **changes}, FEWSHOT_SCHEMA, prefix="fewshot")


def tiny_features(tmp_path_factory, tiny_manifest, *, backbone: str = "efficientnet_lite0", tta: str = "none"):
    """Real features of the tiny manifest (view 0 [+ its mirror] + 1 light view of train/val) from ``backbone``.

    The store lives under the session's base temp dir, so every test module that asks reads the same rows."""
    from dataset.manifest import read_manifest
    from dataset.views import study_requests
    from extract.cache import load_feature_set
    from extract.engine import PassSettings, ensure_rows
    from tests.conftest import DATA_ROOT

    manifest = read_manifest(tiny_manifest)
    result = ensure_rows(manifest=manifest, backbone=backbone, policy="light", view_seed=0,
                         requests=study_requests(manifest, views=1, tta=tta),
                         store_root=tmp_path_factory.getbasetemp() / "classify_lite0_store",
                         settings=PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False),
                         data_root=DATA_ROOT)
    return load_feature_set(result.stores["pooled"], manifest=manifest, views=1, tta=tta, policy="light",
                            view_seed=0)


def tiny_lite0_features(tmp_path_factory, tiny_manifest, *, tta: str = "none"):
    return tiny_features(tmp_path_factory, tiny_manifest, tta=tta)


EXTRACT_CONFIG = {"views": 1, "tta": "none", "policy": "light", "view_seed": 0}  # what tiny_features read


def steady_trial_clock(monkeypatch) -> None:
    """Every trial lasts one tick of the tuner's clock, so two searches' trial records (seconds included) can be
    compared whole (an exact val tie goes to the earlier trial whatever the seconds). Only the tuner's clock
    (study.tune.time) is steadied: the refit and predictions keep the real one."""
    import study.tune

    ticks = iter(range(10**9))
    monkeypatch.setattr(study.tune, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks)),
                                                            time=time.time))
