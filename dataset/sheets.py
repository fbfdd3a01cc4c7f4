"""Pictures of the dataset: a contact sheet (a few images per source) and one image under each augmentation policy.

Composed with PIL (paste + text): a grid of thumbnails needs no axes, and matplotlib's layout
engine took ~10 s for these two sheets, most of a warm rebuild.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2

from dataset.images import load_rgb
from dataset.transforms import POLICIES, apply_view, augment_transform
from study.atomic import atomic_path

PER_SOURCE = 8
VIEWS = 4
CELL = 160  # thumbnail box, pixels
CAPTION = 26  # caption band under each thumbnail, pixels
# A generic ImageNet-style data config for the pictures; the study's own configs come from each backbone.
SHEET_DATA_CONFIG = {"input_size": [3, 224, 224], "resize": 256, "crop_size": 224, "interpolation": "bilinear",
                     "antialias": True, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _grid(cells: list[list[tuple[Image.Image, str]]], *, title: str) -> Image.Image:
    """Rows of (image, caption) cells on a white sheet, each image fitted into a CELL x CELL box."""
    n_cols = max(len(row) for row in cells)
    sheet = Image.new("RGB", (n_cols * CELL, 20 + len(cells) * (CELL + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill="black")
    for r, row in enumerate(cells):
        for c, (img, caption) in enumerate(row):
            thumb = img.copy()
            thumb.thumbnail((CELL - 4, CELL - 4))
            x, y = c * CELL, 20 + r * (CELL + CAPTION)
            sheet.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
            for k, line in enumerate(caption.split("\n")[:2]):
                draw.text((x + 3, y + CELL + k * 12), line[:26], fill="black")
    return sheet


def _save(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=1)  # level 6 (the default): half a sheet's time, and no smaller


def contact_sheet(manifest: pd.DataFrame, *, data_root: Path, path: Path, seed: int) -> None:
    """PER_SOURCE images per source (seeded draw), one row per source, captioned with source and class."""
    rng = np.random.default_rng(seed)
    rows = []
    for source in dict.fromkeys(manifest["source"]):
        of_source = manifest[manifest["source"] == source]
        picks = of_source.iloc[np.sort(rng.choice(len(of_source), size=min(PER_SOURCE, len(of_source)),
                                                  replace=False))]
        rows.append([(load_rgb(Path(data_root) / r.path), f"{source}\n{r.class_name}")
                     for r in picks.itertuples(index=False)])
    _save(_grid(rows, title=f"{len(manifest)} images, {manifest['label'].nunique()} classes (seed {seed})"), path)


def _uint8_steps(transform: v2.Compose) -> v2.Compose:
    """``transform`` up to its uint8 image: its last two steps (to float, normalise) draw nothing, and drawing
    their output would only undo them (a tenth of a second per sheet, for the same pixels)."""
    head, tail = transform.transforms[:-2], transform.transforms[-2:]
    if not (len(tail) == 2 and isinstance(tail[0], v2.ToDtype) and isinstance(tail[1], v2.Normalize)):
        raise ValueError(f"a view transform ending in {tail!r}; expected ToDtype, Normalize")
    return v2.Compose(head)


def _to_display(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray(tensor.permute(1, 2, 0).numpy())


def augmentation_sheet(manifest: pd.DataFrame, *, data_root: Path, path: Path, seed: int) -> None:
    """A training image (seeded draw) under each policy: one row per policy, views 1..VIEWS of a generic 224 px config
    (extraction draws its own views, seeded by each image's content, at each backbone's size)."""
    train = manifest[manifest["split"] == "train"]
    pool = (train if len(train) else manifest).sort_values("sample_id")
    sample = pool.iloc[int(np.random.default_rng(seed).integers(len(pool)))]
    img = load_rgb(Path(data_root) / sample["path"])
    rows = []
    for policy in POLICIES:
        transform = _uint8_steps(augment_transform(SHEET_DATA_CONFIG, policy))
        rows.append([(_to_display(apply_view(transform, img, seed=seed, sample_id=sample["sample_id"], view=v)),
                      f"{policy}\nview {v}") for v in range(1, VIEWS + 1)])
    _save(_grid([[(img, "original\n")], *rows], title=sample["sample_id"]), path)
