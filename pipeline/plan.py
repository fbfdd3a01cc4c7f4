"""The study's plan before any extraction or training: per backbone, the image-views the shared pass must
compute (and how many are stored already), the heads to fit and the fine-tunes to train, with a time
estimate from this machine's measured throughput.

The throughput is the one the store recorded for that backbone's earlier passes here (rows / compute
seconds), else a short timing of the bare forward on 16 random images (one batch, after a warm-up):
an upper bound, since decoding and storing are not in it. ``run_study.py --plan`` prints the plan and
exits; every run logs it after the dataset stage has built every split seed's manifest.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class BackbonePlan:
    backbone: str
    layers: list[str]
    requested: int  # distinct image-views the study reads
    stored: int  # of those, already in every layer's entry
    img_per_s: float | None
    throughput_from: str
    heads: int
    finetunes: list[str]
    skipped: str | None = None

    @property
    def to_compute(self) -> int:
        return self.requested - self.stored

    @property
    def estimate_s(self) -> float | None:
        return self.to_compute / self.img_per_s if self.img_per_s else None


@dataclass
class Plan:
    backbones: list[BackbonePlan] = field(default_factory=list)
    fused_heads: int = 0
    ensembles: int = 0  # ensembles of fine-tunes per seed: no training, their members' outputs averaged

    def lines(self) -> list[str]:
        out = ["plan (before any extraction or training):"]
        for b in self.backbones:
            if b.skipped:
                out.append(f"  {b.backbone}: skipped ({b.skipped})")
                continue
            eta = f"~{b.estimate_s / 60:.1f} min at {b.img_per_s:.1f} img/s ({b.throughput_from})" \
                if b.estimate_s is not None else "no estimate"
            out.append(f"  {b.backbone}: {b.to_compute} of {b.requested} image-views to compute "
                       f"({b.stored} stored) for layers {', '.join(b.layers)}: {eta}; "
                       f"{b.heads} heads to fit; fine-tunes {', '.join(b.finetunes) or 'none'}")
        if self.fused_heads:
            out.append(f"  fused feature sets: {self.fused_heads} heads to fit")
        if self.ensembles:
            out.append(f"  fine-tune ensembles: {self.ensembles} per seed (nothing trains: they average their "
                       "members' fine-tunes)")
        total = sum(b.estimate_s or 0 for b in self.backbones)
        out.append(f"  shared pass total: ~{total / 60:.1f} min (fine-tuning epochs come on top)")
        return out


def make_plan(ctxs: list) -> Plan:
    """The plan over every split seed's context (their manifests must exist: the dataset stage runs first)."""
    from dataset.manifest import read_manifest
    from extract.backbones import WeightsUnavailable
    from extract.engine import open_stores, plan_layers, store_keys
    from extract.stage import cut_policies, pass_settings, requests_of

    ctx = ctxs[0]
    cfg = ctx.config["extract"]
    keys: dict = {}
    for seed_ctx in ctxs:  # the union over seeds: a later seed needs views of images earlier seeds held out
        manifest = read_manifest(seed_ctx.manifest_path)
        keys.update(dict.fromkeys(store_keys(manifest, requests_of(ctx.config, manifest), policy=cfg["policy"],
                                             view_seed=cfg["view_seed"])))
    keys = list(keys)
    plan = Plan()
    stages = ctx.config.get("stages", [])
    classify_cfg = ctx.config["classify"]
    n_heads = len(classify_cfg["heads"]) * len(classify_cfg["feature_sets"]) * len(ctxs)
    for name in cfg["backbones"]:
        layers = plan_layers(name, cut_policies(ctx.config))
        try:
            stores = open_stores(backbone=name, layers=layers, store_root=ctx.store_dir,
                                 settings=pass_settings(cfg, device=ctx.device), weights_file=cfg["weights"].get(name))
        except WeightsUnavailable as exc:
            plan.backbones.append(BackbonePlan(name, [], len(keys), 0, None, "", 0, [], skipped=exc.reason))
            continue
        indexes = {n: _stored_index(s, rebuild=ctx.rebuild_cache) for n, s in stores.items()}
        missing = set()
        for index in indexes.values():
            missing |= set(keys) if index is None else set(index.missing(keys))
        rate, source = _throughput(name, indexes.get("pooled"), ctx)
        plan.backbones.append(BackbonePlan(
            backbone=name, layers=[layer.name for layer in layers], requested=len(keys),
            stored=len(keys) - len(missing), img_per_s=rate, throughput_from=source,
            heads=n_heads if "classify" in stages else 0,
            finetunes=[f"{p} x{len(ctxs)} seeds" for p in ctx.config["finetune"]["policies"]]
            if "finetune" in stages and name in (ctx.config["finetune"]["backbones"] or cfg["backbones"]) else []))
    plan.fused_heads = len(classify_cfg["fusions"]) * n_heads if "classify" in stages else 0
    plan.ensembles = len(ctx.config["finetune"]["ensembles"]) if "finetune" in stages else 0
    return plan


def _stored_index(store, *, rebuild: bool):
    """The entry's index for counting stored rows; None when it is absent, rebuilt by this run, or damaged -- a
    damaged entry is named and the plan goes on (its rows count as to compute), so that ``--rebuild-cache``
    reaches the extract stage that repairs it."""
    from extract.store import StoreDamaged

    if rebuild or not store.dir.is_dir() or not ((store.dir / "spec.json").exists() or store.segments()):
        return None  # (a folder holding only lock files: an entry removed and not yet written again)
    try:
        store.check_spec()
        return store.index()
    except StoreDamaged as exc:
        log.warning("store entry %s (%s) is damaged: %s. The plan counts its rows as to compute; without "
                    "--rebuild-cache the extract stage stops here", store.key[:12], store.label, exc)
        return None


def _throughput(name: str, index, ctx) -> tuple[float | None, str]:
    if index is not None and index.seconds and sum(index.seconds.values()) > 0:
        return sum(index.sizes.values()) / sum(index.seconds.values()), "this store's earlier passes"
    try:
        return _bare_forward(name, ctx), "bare forward timed now; decoding not included"
    except Exception as exc:  # an estimate must never stop the study
        log.debug("no throughput estimate for %s: %s", name, exc)
        return None, ""


def _bare_forward(name: str, ctx, n: int = 16) -> float:
    import torch

    from extract.backbones import load_backbone
    from study.precision import autocast

    cfg = ctx.config["extract"]
    bb = load_backbone(name, weights_file=cfg["weights"].get(name), pretrained=False)
    size = bb.data_config["crop_size"]
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = bb.model.eval().to(ctx.device, memory_format=fmt)
    x = torch.randn(n, 3, size, size, device=ctx.device).contiguous(memory_format=fmt)
    with torch.inference_mode(), autocast(cfg["precision"], ctx.device):
        model(x[:2])
        t0 = time.perf_counter()
        model(x)
        return n / (time.perf_counter() - t0)
