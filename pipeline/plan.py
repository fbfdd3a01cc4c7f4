"""The study's plan before any extraction or training: per backbone, the image-views the shared pass must
compute (and how many are stored already), the heads to fit and the fine-tunes to train, and with
``calibrate`` the time of every stage (extraction, head searches, fine-tune searches, few-shot curves, report)
from throughputs measured on this machine now (pipeline/estimate.py).

``run_study.py --plan`` prints the calibrated plan and exits, leaving no run folder; every run logs the plan
without the calibration (its counts, and the extraction time where the store recorded a rate) after the dataset
stage has built every split seed's manifest.
"""
from __future__ import annotations

import logging
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
    stages: list[tuple[str, float, str]] = field(default_factory=list)  # (stage, seconds, how) when calibrated

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
                       f"{b.heads} head searches; fine-tunes {', '.join(b.finetunes) or 'none'}")
        if self.fused_heads:
            out.append(f"  fused feature sets: {self.fused_heads} head searches")
        if self.ensembles:
            out.append(f"  fine-tune ensembles: {self.ensembles} per seed (nothing trains: they average their "
                       "members' fine-tunes)")
        if not self.stages:
            total = sum(b.estimate_s or 0 for b in self.backbones)
            out.append(f"  shared pass total: ~{total / 60:.1f} min (run_study.py --plan times every stage)")
            return out
        for stage, seconds, how in self.stages:
            out.append(f"  time, {stage}: ~{seconds / 60:.1f} min ({how})")
        total = sum(seconds for _, seconds, _ in self.stages)
        out.append(f"  total: ~{total / 60:.1f} min on this machine at its load while calibrating")
        return out


def make_plan(ctxs: list, *, calibrate: bool = False) -> Plan:
    """The plan over every split seed's context (their manifests must exist: the dataset stage runs first);
    ``calibrate`` times every stage on this machine (a few seconds per backbone)."""
    from dataset.manifest import read_manifest
    from extract.backbones import WeightsUnavailable
    from extract.engine import open_stores, plan_layers, store_keys
    from extract.stage import cut_policies, pass_settings, requests_of

    ctx = ctxs[0]
    cfg = ctx.config["extract"]
    keys: dict = {}
    manifests = [read_manifest(c.manifest_path) for c in ctxs]
    for manifest in manifests:  # the union over seeds: a later seed needs views of images earlier seeds held out
        keys.update(dict.fromkeys(store_keys(manifest, requests_of(ctx.config, manifest), policy=cfg["policy"],
                                             view_seed=cfg["view_seed"])))
    keys = list(keys)
    plan, rates = Plan(), {}
    stages = ctx.config.get("stages", [])
    classify_cfg = ctx.config["classify"]
    n_heads = len(ctxs) if "classify" in stages else 0  # one head search per backbone and split seed
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
        rate, source = _throughput(indexes.get("pooled"))
        if calibrate:
            rates[name] = _calibrated(name, ctx, manifest=manifests[0], stored_rate=rate)
            rate, source = (rates[name].extract, rates[name].extract_from) if rates[name] else (rate, source)
        plan.backbones.append(BackbonePlan(
            backbone=name, layers=[layer.name for layer in layers], requested=len(keys),
            stored=len(keys) - len(missing), img_per_s=rate, throughput_from=source, heads=n_heads,
            finetunes=[f"{p} x{len(ctxs)} seeds" for p in ctx.config["finetune"]["policies"]]
            if "finetune" in stages and name in (ctx.config["finetune"]["backbones"] or cfg["backbones"]) else []))
    plan.fused_heads = len(classify_cfg["fusions"]) * n_heads
    plan.ensembles = len(ctx.config["finetune"]["ensembles"]) if "finetune" in stages else 0
    if calibrate:
        plan.stages = _stage_times(plan, ctxs, manifests=manifests, rates=rates)
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


def _throughput(index) -> tuple[float | None, str]:
    if index is not None and index.seconds and sum(index.seconds.values()) > 0:
        return sum(index.sizes.values()) / sum(index.seconds.values()), "this store's earlier passes"
    return None, "no rate yet: run_study.py --plan times one"


_RATES: dict = {}  # one calibration per backbone and settings in a process (a test plans many tiny studies)


def _calibrated(name: str, ctx, *, manifest, stored_rate):
    from pipeline.estimate import calibrate
    from study.hashing import spec_hash

    key = spec_hash([name, ctx.device, ctx.config["extract"], ctx.config["finetune"], stored_rate])
    if key not in _RATES:
        try:
            _RATES[key] = calibrate(name, config=ctx.config, manifest=manifest, data_root=ctx.data_root,
                                    device=ctx.device, stored_rate=stored_rate)
        except Exception as exc:  # noqa: BLE001 -- an estimate must never stop the study
            log.warning("no time estimate for %s: %s", name, exc)
            return None
    return _RATES[key]


def _stage_times(plan: Plan, ctxs: list, *, manifests: list, rates: dict) -> list[tuple[str, float, str]]:
    """(stage, seconds, how) for every stage the config runs, from the calibrated rates."""
    from pipeline.estimate import REPORT_S, STAGE_SETUP_S, Split, finetune_seconds
    from study.results import fused_parts

    config, stages = ctxs[0].config, ctxs[0].config.get("stages", [])
    splits = [Split.of(m) for m in manifests]
    live = [b for b in plan.backbones if not b.skipped and rates.get(b.backbone)]
    out = []
    if "extract" in stages:
        seconds = sum(b.to_compute / b.img_per_s + rates[b.backbone].load_s * len(ctxs) for b in live if b.to_compute)
        out.append(("extraction", seconds + STAGE_SETUP_S * len(ctxs), f"{sum(b.to_compute for b in live)} "
                    "image-views at " + ", ".join(f"{b.img_per_s:.1f} img/s ({b.throughput_from})" for b in live)))
    if "classify" in stages and live:
        out.append(_head_times(config, splits, rates=rates, live=live, parts_of=fused_parts))
    if "finetune" in stages:
        names = [b.backbone for b in live if b.finetunes]
        seconds = sum(finetune_seconds({**config, "seed": c.config["seed"]}, s, rates[n]) for n in names
                      for c, s in zip(ctxs, splits)) + STAGE_SETUP_S * len(ctxs)
        out.append(("fine-tune searches", seconds, f"{len(names)} backbone(s) x {len(ctxs)} split seed(s) x "
                    f"{config['tune']['trials']} trials, policies {', '.join(config['finetune']['policies'])}"))
    if "report" in stages:
        out.append(("report", REPORT_S, "tables and figures"))
    return out


def _head_times(config: dict, splits: list, *, rates: dict, live: list, parts_of) -> tuple[str, float, str]:
    """The classify stage: every head search of every split seed, spread over its worker processes."""
    import joblib

    from pipeline.estimate import STAGE_SETUP_S, head_seconds

    cfg = config["classify"]
    searches = [([b.backbone], [f for f in cfg["feature_sets"]]) for b in live]
    names = {b.backbone for b in live}
    searches += [(parts, [f for f in cfg["feature_sets"] if f != "stages"] or ["clean"]) for parts in cfg["fusions"]
                 if set(parts) <= names]
    seconds = []
    for parts, feature_sets in searches:
        dim = sum(rates[p].feature_dim for p in parts)
        dims = (dim, dim + sum(rates[p].cut_channels for p in parts))
        seconds += [head_seconds({**config, "seed": seed}, split, dim=dims, feature_sets=feature_sets,
                                 views=config["extract"]["views"])
                    for seed, split in zip([s for s in (config.get("seeds") or [config["seed"]])], splits)]
    workers = max(1, min(cfg["n_jobs"] or joblib.cpu_count(), len(seconds)))
    return ("head searches", sum(seconds) / workers + STAGE_SETUP_S * len(splits),
            f"{len(seconds)} searches x {config['tune']['trials']} trials on {workers} process(es)")
