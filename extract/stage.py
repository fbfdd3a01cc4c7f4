"""The extract stage: every configured backbone's features into ``<out>/features/<key>.h5``.

Backbones whose weights cannot be had here are recorded in ``skipped.jsonl`` with the exact fix
and skipped; the run goes on. ``<run>/features.json`` lists the caches for the classify stage.
Under torchrun, every rank extracts its share and rank 0 writes the run's files.
"""
from __future__ import annotations

import json
import logging

from extract.backbones import WeightsUnavailable, backbone_spec
from extract.engine import extract_features
from study import distributed
from study.atomic import write_text_atomic
from study.results import append_skip

log = logging.getLogger(__name__)


def run(ctx) -> None:
    cfg = ctx.config["extract"]
    distributed.init_from_env()
    names = cfg["backbones"]
    _check_names(names, cfg["weights"])
    entries = []
    for name in names:
        try:
            path = extract_features(
                manifest_path=ctx.manifest_path, backbone=name, cache_dir=ctx.features_dir, views=cfg["views"],
                policy=cfg["policy"], seed=ctx.seed, tta=cfg["tta"], device=ctx.device, batch_size=cfg["batch_size"],
                num_workers=cfg["num_workers"], precision=cfg["precision"], storage_dtype=cfg["storage_dtype"],
                weights_file=cfg["weights"].get(name), rebuild=ctx.rebuild_cache, data_root=ctx.data_root,
                channels_last=cfg["channels_last"])
        except WeightsUnavailable as exc:
            log.warning("skipping backbone %s: %s", name, exc)
            if distributed.is_main():
                append_skip(ctx.run_dir, stage="extract", what=f"backbone {name}", reason=exc.reason, fix=exc.fix)
            continue
        entries.append({"backbone": name, "path": str(path), "key": path.stem})
    if distributed.is_main():
        write_text_atomic(ctx.run_dir / "features.json", json.dumps(entries, indent=2) + "\n")


def _check_names(names: list[str], weights: dict) -> None:
    """Unknown backbone names fail before any work (weights problems are per-backbone skips instead)."""
    unknown_weights = sorted(set(weights) - set(names))
    if unknown_weights:
        raise ValueError(f"config extract.weights names {unknown_weights}, which are not in extract.backbones "
                         f"{names}; fix the name or add the backbone")
    for name in names:
        try:
            backbone_spec(name, pretrained=False)
        except ValueError as exc:
            raise ValueError(f"config extract.backbones: {exc}") from exc
