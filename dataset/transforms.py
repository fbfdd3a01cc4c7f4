"""Pre-processing per backbone and augmentation policies, both as plain data.

A *data config* is the plain dict a backbone's weights were trained with (from timm's
``resolve_data_config`` or torchvision's ``weights.transforms()``), normalised to::

    {"input_size": [3, H, W], "resize": int, "crop_size": int, "interpolation": "bilinear"|"bicubic",
     "antialias": bool, "mean": [r, g, b], "std": [r, g, b]}

Eval pre-processing is: resize the shorter side to ``resize``, centre-crop ``crop_size``,
to float in [0, 1], normalise. An *augmentation policy* is a named dict (``POLICIES``); views
1..K of a training image apply it with a seed derived from (view seed, image sha256, view), so a
view is the same image on every run, in every worker, on every rank, whatever split it is in.
"""
from __future__ import annotations

import hashlib

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

POLICIES: dict[str, dict] = {
    "none": {},
    # The usual ImageNet-style training view, with a milder minimum scale: Caltech objects are
    # centred and fill the frame, so crops below ~1/3 of the image often lose the object.
    "light": {"random_resized_crop": {"scale": [0.35, 1.0], "ratio": [0.75, 4 / 3]}, "hflip": 0.5},
    "strong": {
        "random_resized_crop": {"scale": [0.35, 1.0], "ratio": [0.75, 4 / 3]},
        "hflip": 0.5,
        "color_jitter": [0.3, 0.3, 0.3, 0.0],
        "auto_augment": "trivialaugment",
    },
    "strong_ra": {
        "random_resized_crop": {"scale": [0.35, 1.0], "ratio": [0.75, 4 / 3]},
        "hflip": 0.5,
        "color_jitter": [0.3, 0.3, 0.3, 0.0],
        "auto_augment": "randaugment",
    },
}

_INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
           "nearest": InterpolationMode.NEAREST}
DATA_CONFIG_KEYS = ("input_size", "resize", "crop_size", "interpolation", "antialias", "mean", "std")


def check_data_config(cfg: dict) -> dict:
    missing = [k for k in DATA_CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"data config lacks {missing}; it has {sorted(cfg)}")
    if cfg["interpolation"] not in _INTERP:
        raise ValueError(f"data config interpolation {cfg['interpolation']!r}; allowed: {sorted(_INTERP)}")
    return cfg


def policy_spec(name: str) -> dict:
    if name not in POLICIES:
        raise ValueError(f"augmentation policy {name!r}; allowed: {sorted(POLICIES)}")
    return {"name": name, **POLICIES[name]}


def _to_tensor(cfg: dict) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])]


def eval_transform(data_config: dict) -> v2.Compose:
    cfg = check_data_config(data_config)
    interp = _INTERP[cfg["interpolation"]]
    return v2.Compose([
        v2.Resize(cfg["resize"], interpolation=interp, antialias=cfg["antialias"]),
        v2.CenterCrop(cfg["crop_size"]),
        *_to_tensor(cfg),
    ])


def augment_transform(data_config: dict, policy: str) -> v2.Compose:
    """The training-view transform for ``policy``; ``none`` is the eval transform."""
    cfg, spec = check_data_config(data_config), policy_spec(policy)
    if policy == "none":
        return eval_transform(cfg)
    interp = _INTERP[cfg["interpolation"]]
    rrc = spec["random_resized_crop"]
    steps = [v2.RandomResizedCrop(cfg["crop_size"], scale=tuple(rrc["scale"]), ratio=tuple(rrc["ratio"]),
                                  interpolation=interp, antialias=cfg["antialias"])]
    if spec.get("hflip"):
        steps.append(v2.RandomHorizontalFlip(spec["hflip"]))
    if spec.get("color_jitter"):
        steps.append(v2.ColorJitter(*spec["color_jitter"]))
    auto = spec.get("auto_augment")
    if auto == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=interp))
    elif auto == "randaugment":
        steps.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=interp))
    return v2.Compose([*steps, *_to_tensor(cfg)])


def view_seed(*, seed: int, sample_id: str, view: int) -> int:
    digest = hashlib.sha256(f"{seed}:{sample_id}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def apply_view(transform, img: Image.Image, *, seed: int, sample_id: str, view: int) -> torch.Tensor:
    """Apply a random ``transform`` reproducibly for (seed, sample_id, view).

    torchvision's transforms draw from torch's global generator, so the draw is scoped with
    ``fork_rng``: the caller's RNG state is restored afterwards and nothing else is re-seeded.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(seed=seed, sample_id=sample_id, view=view))
        return transform(img)


# Test-time augmentation: extra deterministic views of *every* image (all splits), averaged at scoring.
# View ids: 0 = clean; MIRROR_VIEW = the clean view mirrored left-right; 1..K = augmented training views.
MIRROR_VIEW = -1
TTA_VIEWS = {"none": (), "hflip": (MIRROR_VIEW,)}


def tta_views(tta: str) -> tuple[int, ...]:
    """The extra view ids of test-time augmentation ``tta``."""
    if tta not in TTA_VIEWS:
        raise ValueError(f"test-time augmentation {tta!r}; allowed: {sorted(TTA_VIEWS)}")
    return TTA_VIEWS[tta]


def make_view(img: Image.Image, *, clean, augment, seed: int, content_id: str, view: int) -> torch.Tensor:
    """View ``view`` of ``img``: the clean eval tensor, its mirror, or augmented view ``view`` >= 1.

    Augmented views are seeded by ``content_id`` (the image's sha256), not by its sample id or split, so
    an image's view k is the same whichever split seed, class set or source list put it in the study."""
    if view == 0:
        return clean(img)
    if view == MIRROR_VIEW:
        # The mirror of the clean tensor itself (not a re-crop of the mirrored image), so a centre
        # crop with an odd margin cannot shift it by a pixel.
        return torch.flip(clean(img), dims=[-1])
    if view < 0:
        raise ValueError(f"view {view}; allowed: 0, {MIRROR_VIEW} (mirror) or >= 1 (augmented)")
    return apply_view(augment, img, seed=seed, sample_id=content_id, view=view)
