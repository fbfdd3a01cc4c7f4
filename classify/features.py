"""From a feature cache and the manifest's splits to the rows a head fits, selects and is scored on.

Splits come from the manifest only (DESIGN.md: splits are made once). Feature sets:

- ``clean``: view 0 of every image;
- ``aug``: the training rows are views 0..K of the train images (and, for the refit, of the val
  images); selection is still scored on clean val, and test is always clean.

When the cache holds test-time views (``extract.tta = "hflip"``: view -1, the mirror of view 0, for
every image of every split), an image's view-0 row becomes the mean of its view-0 and mirror
embeddings -- for train, val and test alike, so heads fit and score the same kind of feature.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from classify.selection import HeadData, Rows
from dataset.transforms import MIRROR_VIEW

FEATURE_SETS = ("clean", "aug")


def split_of(fs, manifest: pd.DataFrame) -> np.ndarray:
    """The manifest split of every feature row; a row whose sample is not in the manifest is an error."""
    lookup = dict(zip(manifest["sample_id"], manifest["split"]))
    missing = [s for s in np.unique(fs.sample_id) if s not in lookup]
    if missing:
        raise ValueError(f"feature cache {fs.path} has {len(missing)} sample ids that are not in the manifest "
                         f"(first: {missing[0]!r}); the cache was built from another manifest: rerun the extract stage")
    labels = dict(zip(manifest["sample_id"], manifest["label"]))
    wrong = [s for s, y in zip(fs.sample_id, fs.labels) if labels[s] != y]
    if wrong:
        raise ValueError(f"feature cache {fs.path} labels disagree with the manifest (first: {wrong[0]!r}); "
                         "rerun the extract stage")
    return np.array([lookup[s] for s in fs.sample_id])


def head_data(fs, manifest: pd.DataFrame, *, feature_set: str, tta: bool = True) -> HeadData:
    """The rows of ``feature_set``; ``tta=False`` ignores cached mirror views (plain view 0)."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature set {feature_set!r}; allowed: {FEATURE_SETS}")
    split = split_of(fs, manifest)
    view = np.asarray(fs.view)
    clean = view == 0
    X = with_tta_mean(fs) if tta else np.asarray(fs.features)
    rows = Rows(X, np.asarray(fs.labels, dtype=np.int64), np.asarray(fs.sample_id))

    def pick(name: str, *, all_views: bool) -> Rows:
        mask = (split == name) & ((view >= 0) if all_views else clean)
        return rows.take(np.flatnonzero(mask))

    augmented = feature_set == "aug"
    if augmented and not (view[split == "train"] > 0).any():
        raise ValueError(f"feature set 'aug' needs augmented views, but {fs.path} has only view 0 for train; "
                         "set extract.views >= 1 and rerun the extract stage, or use classify.feature_sets=['clean']")
    return HeadData(train=pick("train", all_views=augmented), val=pick("val", all_views=False),
                    val_fit=pick("val", all_views=augmented), test=pick("test", all_views=False))


def with_tta_mean(fs) -> np.ndarray:
    """The cache's features, each view-0 row replaced by the mean of it and its mirror row (if cached)."""
    X = np.asarray(fs.features)
    view, ids = np.asarray(fs.view), np.asarray(fs.sample_id)
    mirror = np.flatnonzero(view == MIRROR_VIEW)
    if not mirror.size:
        return X
    clean = np.flatnonzero(view == 0)
    row_of = dict(zip(ids[clean], clean))
    missing = [s for s in ids[mirror] if s not in row_of]
    if missing or len(mirror) != len(clean):
        raise ValueError(f"feature cache {fs.path}: {len(mirror)} mirror rows for {len(clean)} clean rows "
                         f"(first unmatched: {missing[:1]}); rerun the extract stage with --rebuild-cache")
    X = X.copy()
    target = np.array([row_of[s] for s in ids[mirror]])
    X[target] = (X[target] + X[mirror]) / 2
    return X
