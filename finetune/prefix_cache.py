"""Fine-tuning's frozen-prefix activations, read from the activation store (never a pass of its own).

For ``last:k`` the frozen prefix is deterministic (eval mode, no grad), so its output for an (image,
view) never changes: the extract stage's shared pass stores it once per image (``extract.store``, the
entry of the cut after the prefix's last unit), and every epoch of every fine-tune runs only the
trainable suffix. The ``head`` policy's prefix output is the pooled feature the heads read, so it
reads the very same entry. Per split the views are: train 0..V (clean and V augmented views), val and
test view 0 and its test-time views (the mirror with ``tta = "hflip"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dataset.transforms import tta_views
from finetune.data import split_rows

SPLITS = ("train", "val", "test")


@dataclass
class PrefixSplit:
    acts: torch.Tensor  # (N, V, ...) in the store entry's dtype (float16 by default)
    labels: torch.Tensor  # (N,) int64
    sample_id: list[str]


@dataclass
class PrefixCache:
    splits: dict[str, PrefixSplit]
    key: str  # content identity of every row read (store entry + row digests, in order)
    path: Path  # the store entry
    build_s: float  # compute seconds of these rows (their share of the passes that made them)


def split_views(split: str, *, views: int, tta: str) -> list[int]:
    """The view ids read per image: train 0..V; val and test view 0 and its test-time views."""
    if split == "train":
        return list(range(views + 1))
    return [0, *tta_views(tta)]


def prefix_requests(manifest: pd.DataFrame, *, views: int, tta: str) -> dict[str, list[tuple[int, int]]]:
    """Per split, the (manifest row, view) pairs, image-major (each image's views adjacent)."""
    position = {s: i for i, s in enumerate(manifest["sample_id"])}
    out = {}
    for split in SPLITS:
        rows = [position[s] for s in split_rows(manifest, split)["sample_id"]]
        out[split] = [(m, v) for m in rows for v in split_views(split, views=views, tta=tta)]
    return out


def prefix_identity(store, *, manifest: pd.DataFrame, views: int, tta: str, policy: str, view_seed: int,
                    index=None) -> tuple[str, dict]:
    """The content identity of the rows a fine-tune reads (no data read), and the store keys per split."""
    from extract.engine import store_keys

    index = index or store.index()
    keys = {split: store_keys(manifest, reqs, policy=policy, view_seed=view_seed)
            for split, reqs in prefix_requests(manifest, views=views, tta=tta).items()}
    return store.identity([k for split in SPLITS for k in keys[split]], index), keys


def load_prefix(store, *, manifest: pd.DataFrame, views: int, tta: str, policy: str, view_seed: int) -> PrefixCache:
    """The split-wise (N, V, ...) activations of ``manifest``'s images from ``store``."""
    index = store.index()
    key, keys = prefix_identity(store, manifest=manifest, views=views, tta=tta, policy=policy, view_seed=view_seed,
                                index=index)
    splits = {}
    for split in SPLITS:
        rows = split_rows(manifest, split)
        n_views = len(split_views(split, views=views, tta=tta))
        # In memory at the entry's own dtype: float16 halves it, float32 keeps what a float32 entry stored.
        acts = store.read(keys[split], index, dtype=np.dtype(store.spec["storage_dtype"]))
        acts = acts.reshape(len(rows), n_views, *acts.shape[1:])
        splits[split] = PrefixSplit(acts=torch.from_numpy(acts), labels=torch.tensor(rows["label"].to_numpy(np.int64)),
                                    sample_id=rows["sample_id"].tolist())
    cost = index.cost_s([k for split in SPLITS for k in keys[split]])
    return PrefixCache(splits=splits, key=key, path=store.dir, build_s=cost)
