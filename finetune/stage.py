"""Finetune stage: every configured backbone's fine-tunes searched by the tuner on the manifest's splits
(finetune/search.py: the policy and its settings chosen on val), then the configured ensembles of those
fine-tunes (``finetune.ensembles``: finetune/ensemble.py).

Backbones whose weights are unavailable, and policies a backbone cannot take, are recorded as skips (the run
continues); finished searches are cached in ``ctx.finetune_dir/<run key>/`` and their rows and trials re-appended
on a rerun. The few-shot curves are the fine-tuned backbones' (finetune/fewshot.py; an ensemble draws none: it
would retrain every member at every k).
"""
from __future__ import annotations

import logging

from extract.backbones import WeightsUnavailable, load_backbone
from finetune.inputs import StoreAccess
from finetune.search import applicable, run_finetune
from study import distributed
from study.protocol import curve_on_seed, fewshot_backbones
from study.results import append_rows, append_skip, append_trials, fused_name, val_best

log = logging.getLogger(__name__)


def run(ctx) -> None:
    from extract.stage import finetune_views, pass_settings

    distributed.init_from_env()  # under torchrun: DDP over the ranks; alone: a no-op
    device = distributed.device_for_rank(ctx.device)
    hp = {**ctx.config["finetune"], "views": finetune_views(ctx.config)}
    ecfg = ctx.config["extract"]
    weights = ecfg.get("weights", {})
    done, loaded = [], {}  # this seed's finished fine-tune rows (rank 0); backbone name -> (backbone, store), every rank
    # finetune.backbones is checked against extract.backbones before any work (pipeline.config.check_config).
    for name in [b for b in ecfg["backbones"] if not hp["backbones"] or b in hp["backbones"]]:
        try:
            backbone = load_backbone(name, weights_file=weights.get(name))
        except WeightsUnavailable as exc:
            if distributed.is_main():
                append_skip(ctx.run_dir, stage="finetune", what=name, reason=exc.reason, fix=exc.fix)
            log.warning("finetune: skipping %s: %s", name, exc)
            continue
        # The store the extract stage filled; its settings are the ones that made the rows.
        store = StoreAccess(root=ctx.store_dir, settings=pass_settings(ecfg, device=ctx.device),
                            view_seed=ecfg["view_seed"], weights_file=weights.get(name))
        loaded[name] = (backbone, store)
        done += _search(backbone, store, ctx=ctx, hp=hp, device=device)
    if hp["ensembles"]:
        _ensembles(done, loaded, ctx=ctx, hp=hp, device=device)
    if curve_on_seed(ctx.config):
        _fewshot(loaded, ctx=ctx, hp=hp, device=device)


def _search(backbone, store, *, ctx, hp: dict, device: str) -> list:
    """One backbone's search (its rows, rank 0), the policies it cannot take recorded as skips."""
    policies, refused = applicable(backbone, list(hp["policies"]))
    for policy, reason in refused:
        if distributed.is_main():
            append_skip(ctx.run_dir, stage="finetune", what=f"{backbone.name} {policy}", reason=reason,
                        fix="change finetune.policies")
        log.warning("finetune: %s cannot take %s: %s", backbone.name, policy, reason)
    if not policies:
        return []
    searched = run_finetune(backbone=backbone, manifest_path=ctx.manifest_path, data_root=ctx.data_root,
                            hp={**hp, "policies": policies}, tune_cfg=ctx.config["tune"],
                            tune_dir=ctx.out_dir / "tune", seed=ctx.seed, device=device,
                            finetune_dir=ctx.finetune_dir, store=store, rebuild=ctx.rebuild_cache)
    if searched.rows:
        append_rows(ctx.results_path, searched.rows)
        append_trials(ctx.run_dir, searched.trials)
    return searched.rows


def _ensembles(done: list, loaded: dict, *, ctx, hp: dict, device: str) -> None:
    """One row per configured ensemble whose backbones were all fine-tuned this seed: each member is its
    backbone's val-chosen fine-tune (over the policies). Under torchrun every rank recomputes missing
    predictions with rank 0, which writes the rows."""
    from finetune.ensemble import ensemble_row
    from finetune.search import run_predictions
    from finetune.train import NotFinished

    done = distributed.broadcast_object(done if distributed.is_main() else None)
    for parts in hp["ensembles"]:
        missing = [b for b in parts if not any(r.backbone == b for r in done)]
        if missing:
            if distributed.is_main():
                append_skip(ctx.run_dir, stage="finetune", what=fused_name(parts), reason=f"no fine-tune of {missing}",
                            fix="fine-tune them (finetune.backbones, their weights), or drop this ensemble")
            log.warning("finetune: skipping the ensemble %s: no fine-tune of %s", fused_name(parts), missing)
            continue
        members = []
        try:
            for name in parts:
                row = val_best([r for r in done if r.backbone == name])
                backbone, store = loaded[name]
                members.append((row, run_predictions(backbone=backbone, row=row, manifest_path=ctx.manifest_path,
                                                     data_root=ctx.data_root, hp=hp, tune_cfg=ctx.config["tune"],
                                                     tune_dir=ctx.out_dir / "tune", seed=ctx.seed, device=device,
                                                     finetune_dir=ctx.finetune_dir, store=store)))
        except NotFinished as exc:  # every rank sees the same files, so every rank skips alike
            if distributed.is_main():
                append_skip(ctx.run_dir, stage="finetune", what=fused_name(parts), reason=str(exc),
                            fix="delete the run folder the reason names and rerun, to train that fine-tune again")
            log.warning("finetune: skipping the ensemble %s: %s", fused_name(parts), exc)
            continue
        if distributed.is_main():
            row = ensemble_row(members, n_boot=hp["n_boot"])
            log.info("finetune ensemble %s: val %.4f", row.backbone, row.val_mean_per_class)
            append_rows(ctx.results_path, [row])


def _fewshot(loaded: dict, *, ctx, hp: dict, device: str) -> None:
    """The few-shot curve of every fine-tuned backbone the curve covers (study.protocol.fewshot_backbones): a small
    search per (k, draw) on the head arm's draws. Every rank trains; rank 0 writes the rows."""
    from finetune.fewshot import run_fewshot

    for name in fewshot_backbones(ctx.config, list(loaded)):
        backbone, store = loaded[name]
        rows = run_fewshot(backbone=backbone, config=ctx.config, manifest_path=ctx.manifest_path, run_dir=ctx.run_dir,
                           data_root=ctx.data_root, hp=hp, tune_cfg=ctx.config["tune"], tune_dir=ctx.out_dir / "tune",
                           seed=ctx.seed, device=device, finetune_dir=ctx.finetune_dir, store=store,
                           rebuild=ctx.rebuild_cache)
        if rows and distributed.is_main():
            append_rows(ctx.results_path, rows)
