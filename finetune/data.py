"""Manifest images as tensors for fine-tuning: clean view 0, its mirror (-1), or augmentation view v,
reproducible per (seed, image sha256, view) through dataset.transforms.make_view, in any worker and on any rank.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dataset.images import load_rgb
from dataset.transforms import augment_transform, eval_transform, make_view


class ManifestViews(Dataset):
    """Item i = (views of row i stacked as (V, 3, H, W), i); ``views[i]`` lists the view ids to draw."""

    def __init__(self, *, rows: pd.DataFrame, data_root: Path, data_config: dict, policy: str, seed: int,
                 views: list[list[int]]):
        if len(views) != len(rows):
            raise ValueError(f"{len(views)} view lists for {len(rows)} manifest rows")
        self.paths = [str(Path(data_root) / p) for p in rows["path"]]
        self.content_ids = rows["sha256"].tolist()
        self.clean, self.augment = eval_transform(data_config), augment_transform(data_config, policy)
        self.seed, self.views = seed, views

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        """``i`` -> all of row i's listed views; ``(i, view)`` -> just that view (shape (1, 3, H, W))."""
        i, views = (item[0], [item[1]]) if isinstance(item, tuple) else (item, self.views[item])
        img = load_rgb(self.paths[i])
        return torch.stack([self.view(img, i, v) for v in views]), i

    def view(self, img, i: int, v: int) -> torch.Tensor:
        return make_view(img, clean=self.clean, augment=self.augment, seed=self.seed, content_id=self.content_ids[i],
                         view=v)


def image_loader(dataset: ManifestViews, *, order: np.ndarray, batch_size: int, num_workers: int) -> DataLoader:
    """Batches of (views, row index) in ``order``; views of one image stay adjacent."""
    return DataLoader(torch.utils.data.Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, persistent_workers=False, pin_memory=torch.cuda.is_available())


class EpochItems(Sampler):
    """A sampler whose items the caller sets before each epoch, so one loader (and its workers) serves them all."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


def persistent_loader(dataset: ManifestViews, sampler: EpochItems, *, batch_size: int,
                      num_workers: int) -> DataLoader:
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"the manifest has no '{split}' rows; fine-tuning needs train, val and test splits")
    return rows
