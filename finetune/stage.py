"""Finetune stage: every configured backbone x unfreeze policy, fine-tuned on the manifest's splits.

Backbones whose weights are unavailable are recorded as skips (the run continues); finished runs are
cached in ``ctx.finetune_dir/<run key>/`` and their rows re-appended on a rerun.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from extract.backbones import WeightsUnavailable, load_backbone
from finetune.experiment import run_finetune
from finetune.model import PolicyNotApplicable
from study import distributed
from study.results import append_rows, append_skip

log = logging.getLogger(__name__)


def run(ctx) -> None:
    distributed.init_from_env()  # under torchrun: DDP over the ranks; alone: a no-op
    device = distributed.device_for_rank(ctx.device)
    hp = ctx.config["finetune"]
    weights = ctx.config["extract"].get("weights", {})
    features = _features_paths(ctx.run_dir)
    for name in ctx.config["extract"]["backbones"]:
        try:
            backbone = load_backbone(name, weights_file=weights.get(name))
        except WeightsUnavailable as exc:
            if distributed.is_main():
                append_skip(ctx.run_dir, stage="finetune", what=name, reason=exc.reason, fix=exc.fix)
            log.warning("finetune: skipping %s: %s", name, exc)
            continue
        for policy in hp["policies"]:
            try:
                rows = run_finetune(backbone=backbone, policy=policy, manifest_path=ctx.manifest_path,
                                    data_root=ctx.data_root, hp=hp, seed=ctx.seed, device=device,
                                    finetune_dir=ctx.finetune_dir, prefix_dir=ctx.prefix_dir,
                                    rebuild=ctx.rebuild_cache, features_path=features.get(name))
            except PolicyNotApplicable as exc:
                if distributed.is_main():
                    append_skip(ctx.run_dir, stage="finetune", what=f"{name} {policy}", reason=str(exc),
                                fix="change finetune.policies")
                log.warning("finetune: skipping %s %s: %s", name, policy, exc)
                continue
            if rows:
                append_rows(ctx.results_path, rows)


def _features_paths(run_dir: Path) -> dict[str, Path]:
    """backbone -> feature cache, when this run's extract stage wrote them (the head policy can reuse them)."""
    path = Path(run_dir) / "features.json"
    if not path.is_file():
        return {}
    return {e["backbone"]: Path(e["path"]) for e in json.loads(path.read_text())}
