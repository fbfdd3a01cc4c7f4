"""Pictures of the dataset: a contact sheet (a few images per source) and one image under each augmentation policy."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from dataset.images import load_rgb  # noqa: E402
from dataset.transforms import POLICIES, apply_view, augment_transform  # noqa: E402
from study.atomic import atomic_path  # noqa: E402

PER_SOURCE = 8
VIEWS = 4
# A generic ImageNet-style data config for the pictures; the study's own configs come from each backbone.
SHEET_DATA_CONFIG = {"input_size": [3, 224, 224], "resize": 256, "crop_size": 224, "interpolation": "bilinear",
                     "antialias": True, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _thumb(ax, img, title: str) -> None:
    ax.imshow(img)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def contact_sheet(manifest: pd.DataFrame, *, data_root: Path, path: Path, seed: int) -> None:
    """PER_SOURCE images per source (seeded draw), one row per source, titled with their class."""
    rng = np.random.default_rng(seed)
    sources = list(dict.fromkeys(manifest["source"]))
    fig, axes = plt.subplots(len(sources), PER_SOURCE, figsize=(1.6 * PER_SOURCE, 1.9 * len(sources)), squeeze=False)
    for row, source in zip(axes, sources):
        rows = manifest[manifest["source"] == source]
        picks = rows.iloc[np.sort(rng.choice(len(rows), size=min(PER_SOURCE, len(rows)), replace=False))]
        for ax in row:
            ax.axis("off")
        for ax, r in zip(row, picks.itertuples(index=False)):
            img = load_rgb(Path(data_root) / r.path)
            img.thumbnail((160, 160))
            _thumb(ax, img, f"{source}\n{r.class_name}")
    fig.tight_layout()
    _save(fig, path)


def _to_display(tensor: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(SHEET_DATA_CONFIG["mean"]).view(3, 1, 1)
    std = torch.tensor(SHEET_DATA_CONFIG["std"]).view(3, 1, 1)
    return (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def augmentation_sheet(manifest: pd.DataFrame, *, data_root: Path, path: Path, seed: int) -> None:
    """The first training image under each policy: one row per policy, VIEWS views (view 1..VIEWS) each."""
    train = manifest[manifest["split"] == "train"]
    sample = (train if len(train) else manifest).sort_values("sample_id").iloc[0]
    img = load_rgb(Path(data_root) / sample["path"])
    fig, axes = plt.subplots(len(POLICIES), VIEWS, figsize=(1.9 * VIEWS, 2.0 * len(POLICIES)), squeeze=False)
    for row, policy in zip(axes, POLICIES):
        transform = augment_transform(SHEET_DATA_CONFIG, policy)
        for view, ax in enumerate(row, start=1):
            out = apply_view(transform, img, seed=seed, sample_id=sample["sample_id"], view=view)
            _thumb(ax, _to_display(out), f"{policy} view {view}")
    fig.suptitle(sample["sample_id"], fontsize=8)
    fig.tight_layout()
    _save(fig, path)
