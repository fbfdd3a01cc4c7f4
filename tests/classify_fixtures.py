"""Shared helpers for the classify tests: real Lite0 features of the tiny manifest, a small head config."""
from __future__ import annotations

from classify.config import SCHEMA
from study.schema import validate

# Small grids so that a full sweep of every head on 4 classes takes a second or two.
# One process (n_jobs=1), so that a test's monkeypatch reaches the fitting code; tests of the parallel path
# ask for more.
SMALL_CONFIG = {
    "bootstrap": 50,
    "n_jobs": 1,
    "lr": {"C": [0.01, 0.1, 1.0, 10.0], "norm": ["standard", "l2"], "max_iter": 200},
    "svm": {"kernel": ["linear", "rbf"], "C": [0.1, 1.0], "norm": ["standard"]},
    "knn": {"k": [1, 3], "metric": ["cosine", "euclidean"], "weights": ["distance"], "norm": ["l2"]},
    "fewshot": {"k": [1, 3, 8, 9], "seeds": 2, "pool": "train+val"},
}


def small_classify_config(**changes) -> dict:
    raw = {**SMALL_CONFIG, **changes}
    return validate(raw, SCHEMA, prefix="classify")


def tiny_lite0_features(tmp_path_factory, tiny_manifest, *, tta: str = "none"):
    """Real EfficientNet-Lite0 features of the tiny manifest (view 0 [+ its mirror] + 1 light view of train/val).

    The store lives under the session's base temp dir, so every test module that asks reads the same rows."""
    from dataset.manifest import read_manifest
    from dataset.views import study_requests
    from extract.cache import load_feature_set
    from extract.engine import PassSettings, ensure_rows

    manifest = read_manifest(tiny_manifest)
    result = ensure_rows(manifest=manifest, backbone="efficientnet_lite0", policy="light", view_seed=0,
                         requests=study_requests(manifest, views=1, tta=tta),
                         store_root=tmp_path_factory.getbasetemp() / "classify_lite0_store",
                         settings=PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False))
    return load_feature_set(result.stores["pooled"], manifest=manifest, views=1, tta=tta, policy="light",
                            view_seed=0)


EXTRACT_CONFIG = {"views": 1, "tta": "none", "policy": "light", "view_seed": 0}  # what tiny_lite0_features read
