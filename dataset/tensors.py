"""Images as model inputs: the one Dataset that turns image files and view ids into normalised tensors, for the
shared pass, the naive fine-tune loop and ``pipeline.predict``.

A view is made by ``dataset.transforms.make_view``: the clean eval view 0, its mirror -1, or augmented view k
seeded by (seed, the image's content id, k), so it is the same tensor in any worker, on any rank, in any run.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from dataset.images import ImageLoadError, load_rgb
from dataset.transforms import augment_transform, eval_transform, make_view
from study.hashing import file_sha256


class ImageUnreadable(RuntimeError):
    """An image a consumer listed but cannot use; names the sample, and ``reason`` says why (as ImageLoadError's,
    or ``changed``)."""

    def __init__(self, message: str, *, reason: str = "unreadable"):
        super().__init__(message)  # one positional argument: DataLoader workers re-raise it by its message
        self.reason = reason


def image_root(data_root) -> Path:
    """The folder manifest paths are relative to (default: the shared datasets beside the repository)."""
    from study.config import REPO_ROOT

    return Path(data_root) if data_root is not None else REPO_ROOT.parent / "shared" / "datasets"


class ImageViews(Dataset):
    """Item ``i``: image i's views ``views[i]`` stacked as (V, 3, H, W), and i. Item ``(i, v)``: view ``v`` of
    image i alone, (1, 3, H, W), and i (a view chosen per epoch).

    ``content_ids`` (the images' sha256) seed the augmented views; with ``verify`` a file whose bytes no longer
    hash to its content id is refused, so a view is never stored under another image's key. An unreadable file
    raises ``ImageUnreadable`` naming the image (``names``, else its path)."""

    def __init__(self, *, paths: list, content_ids: list[str] | None, views: list[list[int]], data_config: dict,
                 policy: str, seed: int, names: list[str] | None = None, verify: bool = False):
        if len(views) != len(paths):
            raise ValueError(f"{len(views)} view lists for {len(paths)} images")
        self.paths, self.views, self.seed, self.verify = [Path(p) for p in paths], views, seed, verify
        self.content_ids = content_ids if content_ids is not None else [None] * len(paths)
        self.names = names if names is not None else [str(p) for p in self.paths]
        self.clean, self.augment = eval_transform(data_config), augment_transform(data_config, policy)

    @classmethod
    def of_manifest(cls, rows: pd.DataFrame, *, data_root, views: list[list[int]], data_config: dict, policy: str,
                    seed: int, verify: bool = False) -> "ImageViews":
        """Manifest ``rows`` (paths relative to ``data_root``), named by their sample ids."""
        root = image_root(data_root)
        return cls(paths=[root / p for p in rows["path"]], content_ids=rows["sha256"].tolist(), views=views,
                   names=rows["sample_id"].tolist(), data_config=data_config, policy=policy, seed=seed,
                   verify=verify)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        i, views = (item[0], [item[1]]) if isinstance(item, tuple) else (item, self.views[item])
        img = self.load(i)
        return torch.stack([self.view(img, i, v) for v in views]), i

    def view(self, img, i: int, v: int) -> torch.Tensor:
        if v >= 1 and self.content_ids[i] is None:
            raise ValueError(f"augmented view {v} of {self.names[i]!r}: an augmented view needs the image's content id")
        return make_view(img, clean=self.clean, augment=self.augment, seed=self.seed, content_id=self.content_ids[i],
                         view=v)

    def load(self, i: int):
        path, name, content_id = self.paths[i], self.names[i], self.content_ids[i]
        try:
            img = load_rgb(path)
        except ImageLoadError as exc:
            raise ImageUnreadable(f"sample {name!r} ({path}) cannot be read: {exc.reason} {exc.detail}. "
                                  "The manifest lists it as usable: rebuild the dataset (--stages dataset) "
                                  "so it is excluded, or restore the file", reason=exc.reason) from exc
        if self.verify and content_id and file_sha256(path) != content_id:
            raise ImageUnreadable(f"sample {name!r} ({path}) changed since the manifest was built "
                                  "(sha256 differs); rebuild the dataset (--stages dataset)", reason="changed")
        return img
