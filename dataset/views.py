"""Which views of its images each part of a study reads: the one rule behind the extract stage's requests and
the fine-tunes' inputs.

View ids (``dataset.transforms``): 0 the clean eval view, -1 its mirror, k >= 1 augmented view k. A *part* is
what a fit reads, one split or several: ``train`` and ``train+val`` (the refit) are trained on, views 0..V
(one drawn per epoch); ``val`` and ``test`` are scored, on view 0 and its test-time views.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dataset.manifest import SPLITS
from dataset.transforms import tta_views

PARTS: dict[str, tuple[str, ...]] = {**{s: (s,) for s in SPLITS}, "train+val": ("train", "val")}
TRAIN_PARTS = ("train", "train+val")


def part_views(part: str, *, views: int, tta: str) -> list[int]:
    """The view ids read per image of ``part``: 0..``views`` for a train part, else view 0 and its test-time
    views."""
    if part in TRAIN_PARTS:
        return list(range(views + 1))
    return [0, *tta_views(tta)]


def study_requests(manifest: pd.DataFrame, *, views: int, tta: str) -> list[tuple[int, int]]:
    """The (manifest row, view) pairs a study reads, view by view in manifest order: the union over the parts
    of each part's views of its images, and the test-time views of every image (the heads average a train
    image's view 0 with its mirror too). So: view 0 and the test-time views of every image, augmented views
    1..``views`` of the train and val images (test images are never augmented)."""
    split = manifest["split"].to_numpy()
    rows: dict[int, np.ndarray] = {v: np.ones(len(split), bool) for v in part_views("test", views=views, tta=tta)}
    for part in TRAIN_PARTS:
        held = np.isin(split, PARTS[part])
        for v in part_views(part, views=views, tta=tta):
            rows[v] = rows[v] | held if v in rows else held
    return [(int(m), v) for v, mask in rows.items() for m in np.flatnonzero(mask)]
