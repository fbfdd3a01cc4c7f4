"""Seeded, stratified splits, made once and stored in the manifest.

Each class draws its own permutation from ``np.random.default_rng([seed, <class-name hash>])``,
so a class's split does not change when another class is added or dropped. Protocols:

- ``per_class`` (Caltech 101's): ``train_per_class`` images per class for training, of which
  ``val_per_class`` are held out for model selection; every other image is test.
- ``fraction``: ``train_fraction`` / ``val_fraction`` of each class (rounded), the rest test.
"""
from __future__ import annotations

import hashlib

import numpy as np

from study.errors import StudyError
from study.schema import ConfigError


class TooFewImages(StudyError, ValueError):
    """A class that cannot fill the protocol's splits (raised when ``too_few = "error"``)."""


def class_rng(seed: int, class_name: str) -> np.random.Generator:
    name_key = int.from_bytes(hashlib.sha256(class_name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, name_key])


def split_sizes(n: int, split_cfg: dict) -> tuple[int, int, int] | None:
    """(train, val, test) image counts for a class of ``n`` images, or None if it cannot fill them."""
    if split_cfg["protocol"] == "per_class":
        n_fit, n_val = split_cfg["train_per_class"], split_cfg["val_per_class"]
        sizes = (n_fit - n_val, n_val, n - n_fit)
    else:
        n_train = int(round(split_cfg["train_fraction"] * n))
        n_val = int(round(split_cfg["val_fraction"] * n))
        sizes = (n_train, n_val, n - n_train - n_val)
        if split_cfg["val_fraction"] > 0 and n_val < 1:
            return None
    return sizes if sizes[0] >= 1 and sizes[2] >= 1 and sizes[1] >= 0 else None


def check_split_config(split_cfg: dict, *, needs_val: bool = False) -> None:
    """Refuse split settings that cannot give every class a train, (val) and test part, naming key and value and
    the values that would do.

    ``needs_val``: a stage that selects on val runs (heads and fine-tuning choose their settings on val)."""
    if split_cfg["protocol"] == "per_class":
        n_fit, n_val = split_cfg["train_per_class"], split_cfg["val_per_class"]
        fix = f"set data.split.val_per_class = {n_fit - 1}" if n_fit >= 2 else \
            "set data.split.train_per_class = 2 and data.split.val_per_class = 1"
        if n_val >= n_fit:
            raise ConfigError(f"config key 'data.split.val_per_class' has value {n_val}; allowed: an integer smaller "
                              f"than data.split.train_per_class ({n_fit}), since val is carved from the "
                              f"{n_fit} training images per class: {fix} (or less), or data.split.train_per_class = "
                              f"{n_val + 1} (or more)")
        if needs_val and n_val < 1:
            raise ConfigError(f"config key 'data.split.val_per_class' has value {n_val}; allowed: at least 1 when "
                              "the classify or finetune stage runs (heads and fine-tuning choose their settings "
                              "on val): " + ("set data.split.val_per_class = 1" if n_fit >= 2 else fix)
                              + ", or run only --stages dataset")
    else:
        train, val = split_cfg["train_fraction"], split_cfg["val_fraction"]
        if train + val >= 1:
            raise ConfigError(f"config keys 'data.split.train_fraction' + 'data.split.val_fraction' = "
                              f"{train + val:g}; allowed: a sum below 1, to leave a test part: set "
                              f"data.split.train_fraction = {max(0.1, round(0.9 - val, 2)):g}"
                              + (" and data.split.val_fraction = 0.1" if val >= 0.8 else ""))
        if needs_val and val <= 0:
            raise ConfigError(f"config key 'data.split.val_fraction' has value {val!r}; allowed: above 0 when the "
                              "classify or finetune stage runs (heads and fine-tuning choose their settings on val): "
                              "set data.split.val_fraction = 0.1" + (" and data.split.train_fraction = 0.6"
                                                                    if train >= 0.85 else "")
                              + ", or run only --stages dataset")


def needed_images(split_cfg: dict) -> str:
    if split_cfg["protocol"] == "per_class":
        return f"at least {split_cfg['train_per_class'] + 1} (train_per_class={split_cfg['train_per_class']} + 1 test)"
    return (f"enough for >= 1 train and >= 1 test image at train_fraction={split_cfg['train_fraction']}, "
            f"val_fraction={split_cfg['val_fraction']}")


def _fits(sizes, split_cfg: dict) -> bool:
    return all(split_sizes(n, split_cfg) is not None for n in sizes)


def _per_class_advice(smallest: int, split_cfg: dict) -> str | None:
    """The per_class values that fit a class of ``smallest`` images: train_per_class <= smallest - 1, val carved
    from it (at least 1 when it was asked for), and about a third of each class left for test."""
    val = split_cfg["val_per_class"]
    if smallest - 1 >= val + 1:
        pick = max(val + 1, min(smallest - 1, round(smallest * 2 / 3)))
        return (f"data.split.train_per_class <= {smallest - 1} (e.g. {pick}: {pick - val} train + {val} val images "
                f"per class, the rest test)")
    if smallest >= 3 and val >= 1:
        return (f"data.split.train_per_class = {smallest - 1} with data.split.val_per_class <= {smallest - 2} (e.g. "
                f"1: {smallest - 2} train + 1 val, 1 test)")
    return None


def split_advice(sizes, split_cfg: dict) -> str:
    """What to set so that classes of these ``sizes`` (images per class) fill the splits: the values that work for
    this data, or why none do."""
    sizes = sorted(int(n) for n in sizes)
    smallest, options = sizes[0], []
    if split_cfg["protocol"] == "per_class":
        if (per_class := _per_class_advice(smallest, split_cfg)) is not None:
            options.append(per_class)
        fraction = {**split_cfg, "protocol": "fraction"}
        if _fits(sizes, fraction):
            options.append(f'data.split.protocol = "fraction" ({fraction["train_fraction"]:.0%} train, '
                           f'{fraction["val_fraction"]:.0%} val, the rest test of each class)')
    else:
        for train, val in ((0.6, 0.1), (0.5, 0.2), (0.4, 0.3), (1 / 3, 1 / 3)):
            tried = {**split_cfg, "train_fraction": train, "val_fraction": val if split_cfg["val_fraction"] else 0}
            if _fits(sizes, tried):
                options.append(f"data.split.train_fraction = {train:.2f} and data.split.val_fraction = "
                               f"{tried['val_fraction']:.2f}")
                break
    big = [n for n in sizes if split_sizes(n, split_cfg) is not None]
    if len(big) >= 2 and len(big) < len(sizes):
        options.append(f'data.split.too_few = "drop" (drops the {len(sizes) - len(big)} classes below '
                       f"{min(big)} images, keeps {len(big)})")
    if not options:
        return (f"no split fits a class of {smallest} image{'s' if smallest != 1 else ''} (a class needs a train, a "
                "val and a test image): add images to the smallest classes, or list them in data.drop")
    return f"for this data (smallest class: {smallest} images) set " + ", or ".join(options)


def assign_splits(sample_ids: list[str], *, class_name: str, split_cfg: dict, seed: int) -> dict[str, str] | None:
    """sample_id -> split for one class (sampled without replacement), or None if the class has too few images."""
    sizes = split_sizes(len(sample_ids), split_cfg)
    if sizes is None:
        return None
    canonical = sorted(sample_ids)  # the draw must not depend on listing order
    ordered = [canonical[i] for i in class_rng(seed, class_name).permutation(len(canonical))]
    n_train, n_val, _ = sizes
    return {sid: ("train" if k < n_train else "val" if k < n_train + n_val else "test")
            for k, sid in enumerate(ordered)}


def keep_groups_together(split_of: dict[str, str], *, copies: list[tuple[str, str]],
                         class_of: dict[str, str]) -> dict[str, str]:
    """Move each copy into its kept image's split by swapping splits with a non-copy of the copy's class.

    For protocols that keep duplicates (dedup policy "same_split"): per-class split counts stay
    exactly as drawn, and no image and its copy end up in different splits. ``copies`` holds
    (kept sample_id, copy sample_id) pairs. A copy with no swap partner left raises ValueError.
    """
    split_of = dict(split_of)
    in_group = {s for pair in copies for s in pair}
    partners: dict[tuple[str, str], list[str]] = {}
    for sid in sorted(split_of):
        if sid not in in_group:
            partners.setdefault((class_of[sid], split_of[sid]), []).append(sid)
    for kept, copy in copies:
        if kept not in split_of or copy not in split_of or split_of[copy] == split_of[kept]:
            continue
        pool = partners.get((class_of[copy], split_of[kept]), [])
        if not pool:
            raise ValueError(f"cannot put {copy} in the same split as its copy {kept}: no image of class "
                             f"'{class_of[copy]}' left to swap with; use dedup policy \"drop\"")
        partner = pool.pop()
        partners.setdefault((class_of[copy], split_of[copy]), []).append(partner)
        split_of[partner], split_of[copy] = split_of[copy], split_of[kept]
    return split_of
