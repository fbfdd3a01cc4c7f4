"""Richer features from one backbone: the pooled outputs of its last two stages, side by side.

The ``stages`` feature set of a backbone is, per clean (and test-time) view, its pooled pre-logits
concatenated with the global average of the activations its last stage starts from — the ``last:1``
cut, which the shared pass already stores for fine-tuning (``extract.engine.plan_layers``), so the set
costs no forward of its own: one pass made both parts, and its cost is the pooled rows' cost. Earlier
stages see smaller, less class-specific patterns (Yosinski et al. 2014); whether that helps a linear
head here is for val to say: the set is offered to every head and chosen on val like any other.

Rows are those of the ``clean`` feature set (view 0 and its test-time views; no augmented views), in
the same order, so ``classify.features.head_data(..., feature_set="clean")`` reads it as it reads
clean features. Its key is the hash of both parts' content identities.
"""
from __future__ import annotations

import numpy as np

from extract.blocks import STACKED_CUT, STACKED_SET
from extract.cache import FeatureSet, feature_keys, load_feature_set
from extract.read import EntryReader
from extract.store import Store
from study.hashing import spec_hash

STAGES, CUT = STACKED_SET, STACKED_CUT  # the feature set's name; the store layer it pools (its last stage's input)
_CHUNK_BYTES = 256 << 20  # cut rows read and averaged at a time (a Lite cut row is tens of KiB, ResNet's hundreds)
FORMAT = 1  # bump when the pooling of the cut changes


def load_stages_set(pooled: Store, cut: Store, *, manifest, tta: str, policy: str, view_seed: int) -> FeatureSet:
    """The ``stages`` set of ``manifest``'s images: [pooled | spatial mean of the cut] per clean/test-time view."""
    base = load_feature_set(pooled, manifest=manifest, views=0, tta=tta, policy=policy, view_seed=view_seed)
    _, keys = feature_keys(manifest, views=0, tta=tta, policy=policy, view_seed=view_seed)
    reader = EntryReader(cut)
    parts = [_spatial_mean(acts, cut) for acts in reader.chunks(keys, max_bytes=_CHUNK_BYTES)]
    pooled_cut = np.concatenate(parts) if parts else np.empty((0, 0), np.float32)
    if len(pooled_cut) != len(base.features):
        raise ValueError(f"{cut.dir}: {len(pooled_cut)} cut rows for {len(base.features)} pooled rows")
    spec = {**base.spec, "stages": {"cut": cut.key, "layer": cut.spec["layer"], "reduce": "mean"}}
    return FeatureSet(features=np.concatenate([base.features, pooled_cut], axis=1), labels=base.labels,
                      sample_id=base.sample_id, view=base.view, spec=spec,
                      key=spec_hash({"stages": [base.key, reader.identity(keys)], "reduce": "mean",
                                     "format": FORMAT}), path=base.path,
                      split=base.split, extract_s=base.extract_s, row_cost_s=base.row_cost_s)


def _spatial_mean(acts: np.ndarray, cut: Store) -> np.ndarray:
    if acts.ndim != 4:
        raise ValueError(f"{cut.dir}: the 'stages' set pools (C, H, W) feature maps; this cut has rows of shape "
                         f"{acts.shape[1:]} (a token sequence?): drop 'stages' from classify.feature_sets")
    # (n, C, H, W) -> (n, C): the global average pool the network itself applies after its last stage.
    return acts.mean(axis=(2, 3), dtype=np.float32)
