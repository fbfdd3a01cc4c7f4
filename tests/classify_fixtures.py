"""Shared helpers for the classify tests: real Lite0 features of the tiny manifest, a small head config."""
from __future__ import annotations

from classify.config import SCHEMA
from study.schema import validate

# Small grids so that a full sweep of every head on 4 classes takes a second or two.
SMALL_CONFIG = {
    "bootstrap": 50,
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

    Cached under the session's base temp dir, so every test module that asks gets the same cache hit."""
    from extract.cache import load_features
    from extract.engine import extract_features

    cache_dir = tmp_path_factory.getbasetemp() / "classify_lite0_features"
    path = extract_features(manifest_path=tiny_manifest, backbone="efficientnet_lite0", cache_dir=cache_dir, views=1,
                            policy="light", seed=0, tta=tta, batch_size=16, num_workers=0, precision="fp32")
    return load_features(path)
