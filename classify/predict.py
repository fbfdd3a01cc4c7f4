"""Classify images with a saved head: ``python -m classify.predict --head DIR IMAGE_OR_FOLDER...``.

Loads the backbone named in the head's meta.json (or ``--backbone``), refuses it unless its spec
equals the spec the head was trained on (the error names the differing fields), pre-processes
each image with the backbone's eval transform (and, when the head's features averaged each image with
its mirror -- ``extract.tta = "hflip"`` -- does the same), and prints one line per image: path, class,
probability (for an SVM head: a softmax of its decision values, marked as a score).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from classify.heads import probabilities
from classify.store import load_head
from dataset.tensors import ImageUnreadable, ImageViews
from dataset.transforms import tta_views
from study.errors import StudyError
from study.hashing import spec_differences
from study.precision import autocast

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class HeadMismatch(ValueError):
    """The backbone asked for is not the one the head's features came from."""


@dataclass(frozen=True)
class Prediction:
    path: Path
    class_name: str
    label: int
    probability: float
    calibrated: bool


def refuse_fused(meta: dict, *, head_dir: Path) -> None:
    """A head on fused features needs every part's backbone, one on 'stages' an inner layer; predict embeds
    images with one backbone's pooled output."""
    if meta.get("backbone_spec") is None:
        what = "the 'stages' feature set (pooled + an inner stage)" if meta.get("feature_set") == "stages" \
            else f"fused features ({meta['backbone']})"
        raise HeadMismatch(f"head {head_dir} was trained on {what}: predict embeds images with one backbone's "
                           "pooled output; use a 'clean' or 'aug' head of a single backbone from the same run")


def check_backbone(meta: dict, backbone, *, head_dir: Path) -> None:
    refuse_fused(meta, head_dir=head_dir)
    diffs = spec_differences(meta["backbone_spec"], _json_roundtrip(backbone.spec),
                             labels=("head has", "backbone has"))
    if diffs:
        raise HeadMismatch(f"head {head_dir} was trained on features of {meta['backbone']!r}, and the backbone "
                           f"{backbone.name!r} loaded here differs in: " + "; ".join(diffs)
                           + ". Use the backbone (and weights file) the head was trained with, or retrain the head.")


def _json_roundtrip(spec: dict) -> dict:
    # meta.json stores the spec as JSON (tuples become lists), so compare like with like.
    import json

    from study.hashing import canonical_json
    return json.loads(canonical_json(spec))


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, recursive)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder")
    if not paths:
        raise FileNotFoundError(f"no images found in {inputs}")
    return paths


def predict_images(head_dir: str | Path, paths: list[Path], *, backbone=None, device: str = "cpu",
                   batch_size: int = 32) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Predictions for readable images, and (path, reason) for the ones that could not be read."""
    from extract.backbones import load_backbone

    head_dir = Path(head_dir)
    model, meta = load_head(head_dir)
    backbone = backbone or load_backbone(meta["backbone"])
    check_backbone(meta, backbone, head_dir=head_dir)
    net = backbone.model.to(device).eval()
    # The views the head's features averaged: view 0, and its mirror when ``extract.tta = "hflip"``.
    views = [0, *tta_views(meta.get("features_spec", {}).get("tta", "none"))]
    images = ImageViews(paths=paths, content_ids=None, views=[views] * len(paths), data_config=backbone.data_config,
                        policy="none", seed=0)
    # Embed as the cache did: its resolved precision (a bf16 cache read by an fp32 embedding drifts ~1e-2).
    precision = meta.get("features_spec", {}).get("precision", "fp32")
    results, failed = [], []
    for start in range(0, len(paths), batch_size):
        batch, tensors = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                tensors.append(images[i][0])
                batch.append(paths[i])
            except ImageUnreadable as exc:
                failed.append((paths[i], exc.reason))
        if batch:
            x = torch.stack(tensors)
            with torch.inference_mode(), autocast(precision, device):
                outs = [net(x[:, j].contiguous().to(device)).float() for j in range(len(views))]
                # The head was fitted on the mean of each image's views.
                feats = (outs[0] if len(outs) == 1 else sum(outs[1:], outs[0]) / len(outs)).cpu().numpy()
            results += _label(model, feats, batch, meta["class_names"])
    return results, failed


def _label(model, feats: np.ndarray, paths: list[Path], names: list[str]) -> list[Prediction]:
    probs, calibrated = probabilities(model, feats, n_classes=len(names))
    best = probs.argmax(axis=1)
    return [Prediction(path=p, class_name=names[b], label=int(b), probability=float(probs[i, b]),
                       calibrated=calibrated) for i, (p, b) in enumerate(zip(paths, best))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head", required=True, help="a saved head folder (<out>/heads/<key>/)")
    p.add_argument("--backbone", default=None, help="backbone to load (default: the one in the head's meta.json)")
    p.add_argument("--weights", default=None, help="a local weights file for the backbone")
    p.add_argument("--device", default="cpu")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    args = p.parse_args(argv)
    from extract.backbones import WeightsUnavailable, load_backbone

    try:
        _, meta = load_head(args.head)
        refuse_fused(meta, head_dir=Path(args.head))
        backbone = load_backbone(args.backbone or meta["backbone"], weights_file=args.weights)
        results, failed = predict_images(args.head, image_paths(args.inputs), backbone=backbone, device=args.device)
    except WeightsUnavailable as exc:
        print(f"error: {exc}\nfix: {exc.fix}", file=sys.stderr)
        return 2
    except (HeadMismatch, FileNotFoundError, StudyError) as exc:  # a damaged head dir: HeadDamaged, a StudyError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        what = "probability" if r.calibrated else "score"
        print(f"{r.path}\t{r.class_name}\t{what}={r.probability:.4f}")
    for path, reason in failed:
        print(f"{path}\tskipped: {reason}", file=sys.stderr)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
