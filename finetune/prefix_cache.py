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

from dataset.manifest import SPLITS
from dataset.views import part_views
from finetune.data import split_rows


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


def read_acts(store, keys: list[tuple[str, str]], *, n_views: int, index=None) -> torch.Tensor:
    """(N, n_views, ...) activations of ``keys`` (image-major) at the entry's own dtype (float16 halves the
    memory; a float32 entry keeps what it stored): every activation a fine-tune reads comes through here."""
    acts = store.read(keys, index or store.index(), dtype=np.dtype(store.spec["storage_dtype"]))
    return torch.from_numpy(acts.reshape(len(keys) // n_views, n_views, *acts.shape[1:]))


def load_prefix(store, *, manifest: pd.DataFrame, views: int, tta: str, policy: str, view_seed: int) -> PrefixCache:
    """Every split's activations of ``manifest``'s images from ``store`` (for tests and benchmarks; a fine-tune
    reads part by part through ``read_acts``)."""
    from extract.engine import store_keys

    index, position = store.index(), {s: i for i, s in enumerate(manifest["sample_id"])}
    splits, all_keys = {}, []
    for split in SPLITS:
        rows = split_rows(manifest, split)
        ids = part_views(split, views=views, tta=tta)
        keys = store_keys(manifest, [(position[s], v) for s in rows["sample_id"] for v in ids], policy=policy,
                          view_seed=view_seed)
        all_keys += keys
        splits[split] = PrefixSplit(acts=read_acts(store, keys, n_views=len(ids), index=index),
                                    labels=torch.tensor(rows["label"].to_numpy(np.int64)),
                                    sample_id=rows["sample_id"].tolist())
    return PrefixCache(splits=splits, key=store.identity(all_keys, index), path=store.dir,
                       build_s=index.cost_s(all_keys))
