"""A finished fine-tune as one torch module from images: the backbone's frozen prefix (its pretrained weights), the
trained suffix and the new linear head, in eval mode and float32.

The scored model of a fine-tune row is its last refit (``ResultRow.keys["fit_keys"][-1]``: for ``probe+last:k`` the
``last:k`` phase, which started from the probe's head); ``finetune_dir/fits/<fit key>/`` holds its spec.json and
``last.pt`` (a refit trains a fixed number of epochs and keeps its last). The backbone must be the one it was trained
on (spec.json's ``backbone``): the prefix is not in the checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from finetune.checkpoint import CheckpointDamaged, read_checkpoint
from finetune.model import build_split_net
from study.errors import StudyError
from study.hashing import canonical_json, spec_differences


class FitUnusable(StudyError):
    """A fit folder that cannot give its model (missing, unfinished, damaged, or of another backbone)."""


def fit_spec(fit_dir: Path) -> dict:
    path = Path(fit_dir) / "spec.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FitUnusable(f"{path} is unreadable ({exc}); the fine-tune's folder is incomplete: rerun the study "
                          "with the same config and --out to train it again") from exc


def check_backbone(spec: dict, backbone, *, fit_dir: Path) -> None:
    """Refuse a backbone whose spec (weights, preprocessing...) differs from the one the fit trained on."""
    diffs = spec_differences(spec["backbone"], json.loads(canonical_json(backbone.spec)),
                             labels=("fit has", "backbone has"))
    if diffs:
        raise FitUnusable(f"fine-tune {fit_dir} was trained on {spec['backbone'].get('name')!r}, and the backbone "
                          f"{backbone.name!r} loaded here differs in: " + "; ".join(diffs))


def finetuned_net(fit_dir: str | Path, *, backbone) -> nn.Sequential:
    """Images (N, 3, H, W) -> logits (N, classes) of the fit in ``fit_dir``, on ``backbone``
    (extract.backbones.Backbone, the one it was trained on)."""
    fit_dir = Path(fit_dir)
    spec = fit_spec(fit_dir)
    check_backbone(spec, backbone, fit_dir=fit_dir)
    # A refit trains a fixed number of epochs and keeps its last; a fit on train keeps its best val epoch.
    done = spec.get("epochs")
    path = fit_dir / ("last.pt" if done is not None else "best.pt")
    try:
        kept = read_checkpoint(path)
    except CheckpointDamaged as exc:
        raise FitUnusable(f"{exc}; rerun the study with the same config and --out to train it again") from exc
    if kept.get("run_key") != fit_dir.name or (done is not None and kept.get("epoch", -1) + 1 != done):
        raise FitUnusable(f"{path} is not the finished fit (epoch {kept.get('epoch')} of {done}, run "
                          f"{kept.get('run_key')}); rerun the study with the same config and --out to finish it")
    n_classes = int(kept["model"]["head.1.weight"].shape[0])
    net = build_split_net(backbone, policy=spec["policy"], n_classes=n_classes)
    net.load_trainable_state(kept["model"])
    # The network as one chain (SplitNet.forward in eval mode, without its training-only aux branch).
    return nn.Sequential(net.prefix, *net.suffix, net.tail, net.head).eval()
