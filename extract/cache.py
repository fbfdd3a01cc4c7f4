"""A feature set: one backbone's pooled store rows for one manifest, in the order the heads read them.

Rows are view-major: view 0 of every manifest row (manifest order), then the test-time view -1 of every
row (with ``tta = "hflip"``), then augmented view 1 of the non-test rows, ..., view K. The rows come
from the activation store (``extract.store``) by (image sha256, view); labels and splits come from the
manifest. The set's ``key`` is its content identity: the store entry, the digests of exactly these rows,
and the manifest hash — so a head keyed by it is refit when any byte it read or any label changes, and
reused when a rebuilt store holds the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.read import EntryReader
from extract.store import FORMAT_VERSION, Store, library_versions  # noqa: F401 (library_versions re-exported)
from study.hashing import spec_hash


@dataclass
class FeatureSet:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    sample_id: np.ndarray  # (N,) str
    view: np.ndarray  # (N,) int
    spec: dict
    key: str
    path: Path  # the store entry's folder
    split: np.ndarray | None = None  # (N,) str, from the manifest
    extract_s: float | None = None  # compute seconds of these rows (their share of the passes that made them)
    row_cost_s: np.ndarray | None = None  # (N,) the same per row, so a consumer is charged the rows it uses

    def cost_s(self, mask: np.ndarray) -> float | None:
        """Compute seconds of the rows ``mask`` selects (each distinct stored row once)."""
        return None if self.row_cost_s is None else float(self.row_cost_s[mask].sum())


def feature_set_spec(store: Store, *, views: int, tta: str, policy: dict, view_seed: int, manifest_hash: str) -> dict:
    """What a feature set is made of (also what a saved head records as its ``features_spec``)."""
    s = store.spec
    return {"format": FORMAT_VERSION, "store": store.key, "backbone": s["backbone"], "layer": s["layer"],
            "precision": s["precision"], "storage_dtype": s["storage_dtype"], "channels_last": s["channels_last"],
            "versions": s["versions"], "views": views, "tta": tta, "policy": policy, "view_seed": view_seed,
            "manifest_hash": manifest_hash}


def feature_keys(manifest, *, views: int, tta: str, policy: str, view_seed: int) -> tuple[list, list]:
    """The (manifest row, view) requests of a feature set, view-major, and their store keys."""
    from dataset.views import study_requests
    from extract.engine import store_keys

    requests = study_requests(manifest, views=views, tta=tta)
    return requests, store_keys(manifest, requests, policy=policy, view_seed=view_seed)


def load_feature_set(store: Store, *, manifest, views: int, tta: str, policy: str, view_seed: int) -> FeatureSet:
    """The pooled rows of ``manifest`` from ``store`` (all must be stored: run the extract stage first)."""
    from dataset.manifest import manifest_hash
    from dataset.transforms import policy_spec

    requests, keys = feature_keys(manifest, views=views, tta=tta, policy=policy, view_seed=view_seed)
    reader = EntryReader(store)
    features = reader.array(keys)
    m = np.array([r[0] for r in requests], dtype=np.int64)
    spec = feature_set_spec(store, views=views, tta=tta, policy=policy_spec(policy), view_seed=view_seed,
                            manifest_hash=manifest_hash(manifest))
    key = spec_hash({"spec": spec, "rows": reader.identity(keys)})
    costs = reader.costs(keys)
    return FeatureSet(features=features.reshape(len(keys), -1), labels=manifest["label"].to_numpy(np.int64)[m],
                      sample_id=manifest["sample_id"].to_numpy(dtype=str)[m],
                      view=np.array([r[1] for r in requests], dtype=np.int64), spec=spec, key=key, path=store.dir,
                      split=manifest["split"].to_numpy(dtype=str)[m], extract_s=float(costs.sum()), row_cost_s=costs)
