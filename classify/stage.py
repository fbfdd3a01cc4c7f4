"""The classify stage: LR / SVM / kNN heads (and the LR few-shot curve) on each backbone's feature cache.

For every features entry (``<run>/features.json``, written by the extract stage), feature set and
head, the head is selected on val, refit on train+val, scored once on test, saved to
``heads/<key>/`` and its row appended to ``results.jsonl``; a completed head dir is reused as is.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import joblib
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from classify import selection
from classify.features import FEATURE_SETS, head_data
from classify.fewshot import fewshot_pool, fit_fewshot, like_for_like, max_k
from classify.heads import blas_threads, count_parameters, head_grid
from classify.selection import HeadData
from classify.store import cached_rows, head_key, save_head, save_rows
from dataset.manifest import class_names, manifest_hash, read_manifest
from study.atomic import file_lock
from study.metrics import evaluate
from study.protocol import curve_on_seed
from study.provenance import git_sha
from study.results import Costs, Metrics, ResultRow, append_rows, append_skip, val_best

if TYPE_CHECKING:
    from extract.cache import FeatureSet  # noqa: F401 (annotations)

log = logging.getLogger("study.classify")


def run(ctx) -> None:
    # Here, so that the classify modules import without torch.
    from extract.cache import load_feature_set
    from extract.store import Store

    cfg, ecfg = ctx.config["classify"], ctx.config["extract"]
    entries = read_features_index(ctx.run_dir)
    manifest = read_manifest(ctx.manifest_path)
    loaded = {}
    for entry in entries:
        # The pooled rows of this manifest, by image content; the set's key is the identity of exactly these bytes.
        loaded[entry["backbone"]] = load_feature_set(
            Store.open(Path(ctx.out_dir) / entry["store"]), manifest=manifest, views=ecfg["views"], tta=ecfg["tta"],
            policy=ecfg["policy"], view_seed=ecfg["view_seed"])
    extra = {e["backbone"]: _stages_set(e, cfg=cfg, ecfg=ecfg, manifest=manifest, ctx=ctx) for e in entries}
    tasks, sets_of = [], {}
    for backbone, fs in [*loaded.items(), *_fused_sets(cfg["fusions"], loaded, run_dir=ctx.run_dir)]:
        sets_of[backbone] = {"clean": fs, "aug": fs, **(extra.get(backbone) or {})}
        tasks += head_tasks(fs, backbone=backbone, manifest=manifest, cfg=cfg, seed=ctx.seed, run_dir=ctx.run_dir,
                            extra=extra.get(backbone) or {})
    rows = fit_heads(tasks, cfg=cfg, heads_dir=ctx.heads_dir, results_path=Path(ctx.run_dir) / "results.jsonl")
    candidates = [(r, sets_of[r.backbone][r.feature_set]) for r in rows if r.kind == "head"]
    log.info("classify: %d head rows appended to %s", len(rows), ctx.results_path)
    if cfg["fewshot"]["k"] and candidates and curve_on_seed(ctx.config):
        with blas_threads(cfg["blas_threads"]):
            _chosen_fewshot(candidates, manifest=manifest, cfg=cfg, ctx=ctx)


def _chosen_fewshot(candidates: list[tuple[ResultRow, FeatureSet]], *, manifest, cfg: dict, ctx) -> None:
    """The few-shot curve of the arm's val-chosen head (over every backbone, fused set, head and feature set
    of this split seed, or those of the fine-tuned backbones: ``like_for_like``): its method, settings and
    feature set refit on k images per class."""
    best = val_best(like_for_like([r for r, _ in candidates], ctx.config))
    row, fs = next((r, f) for r, f in candidates if r is best)
    data = head_data(fs, manifest, feature_set="aug" if row.feature_set == "aug" else "clean")
    job = HeadJob(backbone=row.backbone, fs=fs, seed=ctx.seed, n_boot=cfg["bootstrap"],
                  class_names=tuple(class_names(manifest)), manifest_hash=manifest_hash(manifest))
    log.info("few-shot curve of the val-chosen head: %s %s (%s), val %.4f", row.backbone, row.method,
             row.feature_set, row.val_mean_per_class)
    rows = cached_fewshot(row.hyperparams, method=row.method, feature_set=row.feature_set, data=data,
                          fewshot_cfg=cfg["fewshot"], head_cfg=cfg[row.method], heads_dir=ctx.heads_dir,
                          run_dir=ctx.run_dir, job=job)
    append_rows(Path(ctx.run_dir) / "results.jsonl", rows)


def _stages_set(entry: dict, *, cfg: dict, ecfg: dict, manifest, ctx) -> dict:
    """{"stages": the backbone's stages feature set} when the config asks for it and its cut is stored."""
    from classify.stacked import CUT, STAGES, load_stages_set
    from extract.store import Store

    if STAGES not in cfg["feature_sets"]:
        return {}
    cut = entry.get("layers", {}).get(CUT)
    if cut is None:  # a backbone without a block list has no cut to pool
        append_skip(ctx.run_dir, stage="classify", what=f"{entry['backbone']} {STAGES}",
                    reason=f"the store holds no {CUT} cut for this backbone",
                    fix="rerun the extract stage with 'stages' in classify.feature_sets (it stores the cut), "
                        "or drop 'stages'")
        return {}
    out = Path(ctx.out_dir)
    return {STAGES: load_stages_set(Store.open(out / entry["store"]), Store.open(out / cut), manifest=manifest,
                                    tta=ecfg["tta"], policy=ecfg["policy"], view_seed=ecfg["view_seed"])}


def _fused_sets(fusions: list[list[str]], loaded: dict, *, run_dir: Path) -> list[tuple]:
    """(name, fused feature set) for each configured fusion whose backbones were all extracted."""
    from classify.fusion import fuse, fused_name

    out = []
    for parts in fusions:
        missing = [b for b in parts if b not in loaded]
        if missing:
            append_skip(run_dir, stage="classify", what=fused_name(parts), reason=f"no features of {missing}",
                        fix="make their weights available (see the extract skips), or drop this fusion")
            continue
        out.append((fused_name(parts), fuse({b: loaded[b] for b in parts})))
    return out


@dataclass(frozen=True)
class HeadJob:
    """What every head of one feature set shares: where its rows come from and how it is scored."""
    backbone: str  # a backbone name, or "fused:a+b"
    fs: FeatureSet
    seed: int  # the split seed (a few-shot draw replaces it with the draw's seed)
    n_boot: int
    class_names: tuple[str, ...]
    manifest_hash: str


def read_features_index(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "features.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: the classify stage reads the feature caches the extract stage lists "
                                "there; run the extract stage in the same run (--stages extract,classify)")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class HeadTask:
    """One head to fit: its method and feature set, the rows it reads and what it is scored with."""
    method: str
    feature_set: str
    data: HeadData
    job: HeadJob


def head_tasks(fs, *, backbone: str, manifest: pd.DataFrame, cfg: dict, seed: int, run_dir: Path,
               extra: dict | None = None) -> list[HeadTask]:
    """Every head and feature set of one feature cache, in config order (a set that cannot be built is a
    recorded skip). ``extra`` maps a feature set name to its own FeatureSet (``stages``), read like ``clean``."""
    extra = extra or {}
    job = HeadJob(backbone=backbone, fs=fs, seed=seed, n_boot=cfg["bootstrap"],
                  class_names=tuple(class_names(manifest)), manifest_hash=manifest_hash(manifest))
    tasks = []
    # A set with a FeatureSet of its own exists for single backbones only (a fused set has no 'stages').
    for feature_set in [f for f in cfg["feature_sets"] if f in extra or f in FEATURE_SETS]:
        set_job = dataclasses.replace(job, fs=extra[feature_set]) if feature_set in extra else job
        try:
            # Built once per feature set: it copies the features (and averages the mirror views in).
            data = head_data(set_job.fs, manifest, feature_set="clean" if feature_set in extra else feature_set)
        except ValueError as exc:
            for method in cfg["heads"]:
                append_skip(run_dir, stage="classify", what=f"{backbone} {method} {feature_set}", reason=str(exc),
                            fix="set extract.views >= 1, or drop 'aug' from classify.feature_sets")
            continue
        # A head reads its HeadData; of the FeatureSet it keeps only the identity, spec and per-row costs,
        # so a worker process is not sent every stored feature again.
        lean = dataclasses.replace(set_job, fs=dataclasses.replace(set_job.fs, features=set_job.fs.features[:0]))
        tasks += [HeadTask(method=method, feature_set=feature_set, data=data, job=lean) for method in cfg["heads"]]
    return tasks


def n_workers(n_jobs: int, n_tasks: int) -> int:
    """Head-fitting processes: ``n_jobs``, or (0) one per usable CPU core (joblib's count, which reads the
    affinity mask and a container's CPU quota); never more than there are heads."""
    return max(1, min(n_jobs or joblib.cpu_count(), n_tasks))


def fit_heads(tasks: list[HeadTask], *, cfg: dict, heads_dir: Path, results_path: Path) -> list[ResultRow]:
    """Fit (or reuse) every task's head, ``classify.n_jobs`` processes at a time, each with
    ``classify.blas_threads`` BLAS threads: the heads are independent, and one head's solvers (lbfgs,
    libsvm, a kNN query) keep about one core busy. Rows are appended to ``results_path`` in task order as
    they arrive, so an interrupted stage loses only the heads in flight (each finished head is saved in
    its own dir by the process that fitted it)."""
    n = n_workers(cfg["n_jobs"], len(tasks))
    log.info("classify: %d heads on %d process(es), %d BLAS thread(s) each", len(tasks), n, cfg["blas_threads"])
    level = logging.getLogger().getEffectiveLevel()
    results = Parallel(n_jobs=n, return_as="generator")(
        delayed(_fit_task)(t, head_cfg=cfg[t.method], heads_dir=heads_dir, blas=cfg["blas_threads"],
                           log_level=level if n > 1 else None) for t in tasks)
    all_rows = []
    # Each head logs its own sweep and score (or its reuse) where it is fitted: a worker logs as the study does.
    for rows in tqdm(results, total=len(tasks), desc="heads", unit="head"):
        append_rows(results_path, rows)
        all_rows += rows
    return all_rows


def _fit_task(task: HeadTask, *, head_cfg: dict, heads_dir: Path, blas: int, log_level: int | None) -> list[ResultRow]:
    if log_level is not None and not logging.getLogger().handlers:  # a fresh worker process: log as the study does
        logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with blas_threads(blas):
        return cached_head(task.method, feature_set=task.feature_set, data=task.data, head_cfg=head_cfg,
                           heads_dir=heads_dir, job=task.job)


def cached_head(method: str, *, feature_set: str, data: HeadData, head_cfg: dict, heads_dir: Path,
                job: HeadJob) -> list:
    key = head_key(features_key=job.fs.key, kind="head", method=method, feature_set=feature_set, settings=head_cfg,
                   seed=job.seed, n_boot=job.n_boot)
    head_dir = Path(heads_dir) / key
    # One fit per head at a time: a second study on this --out waits, then reuses the finished head.
    with file_lock(Path(heads_dir) / f".{key}.lock", what=f"fitting the head {head_dir.name[:12]}"):
        rows = cached_rows(head_dir)
        if rows is not None:
            log.info("%s %s %s: reusing %s", job.backbone, method, feature_set, head_dir)
            return rows
        return _fit_head(method, feature_set=feature_set, data=data, head_cfg=head_cfg, head_dir=head_dir, key=key,
                         job=job)


def _fit_head(method: str, *, feature_set: str, data: HeadData, head_cfg: dict, head_dir: Path, key: str,
              job: HeadJob) -> list[ResultRow]:
    grid = head_grid(method, head_cfg)
    log.info("%s %s %s: sweeping %d grid points on %d train rows", job.backbone, method, feature_set,
             len(grid), len(data.train))
    fit = selection.select_and_refit(method, grid, data=data, seed=job.seed, head_cfg=head_cfg,
                                     n_classes=len(job.class_names))
    # The scored model is the chosen point refit on train+val (select_and_refit); its val score is the point's.
    row = result_row(kind="head", method=method, feature_set=feature_set, data=data, fit=fit, model=fit.model,
                     hyperparams=fit.selection.best.params, job=job, selection=fit.selection,
                     val_mean_per_class=fit.selection.best.val_mean_per_class, fit_on="train+val",
                     keys={"head_key": key})
    save_head(head_dir, model=fit.model, meta=head_meta(row, job))
    save_rows(head_dir, [row])
    log.info("%s %s %s: val %.4f -> test mean per-class %.4f (%s) in %.1fs", job.backbone, method, feature_set,
             row.val_mean_per_class, row.metrics.mean_per_class, row.hyperparams, fit.train_s)
    return [row]


def cached_fewshot(params: dict, *, method: str, feature_set: str, data: HeadData, fewshot_cfg: dict, head_cfg: dict,
                   heads_dir: Path, run_dir: Path, job: HeadJob) -> list[ResultRow]:
    seed = job.seed
    # Which split seeds draw curves decides whether this one runs, not what it computes.
    settings = {method: head_cfg, "chosen": params,
                "fewshot": {k: v for k, v in fewshot_cfg.items() if k != "split_seeds"}}
    head_dir = Path(heads_dir) / head_key(features_key=job.fs.key, kind="fewshot", method=method,
                                          feature_set=feature_set, settings=settings, seed=seed, n_boot=job.n_boot)
    rows = cached_rows(head_dir)
    if rows is not None:
        return rows
    pool = fewshot_pool(data, pool=fewshot_cfg["pool"])
    rows, largest = [], max_k(pool)
    for k in tqdm(fewshot_cfg["k"], desc=f"few-shot {job.backbone} {method}", unit="k"):
        if k > largest:
            append_skip(run_dir, stage="classify", what=f"{job.backbone} few-shot k={k}",
                        reason=f"the smallest class has {largest} images in the '{fewshot_cfg['pool']}' pool",
                        fix="lower classify.fewshot.k" + (" or set classify.fewshot.pool='train+val'"
                                                          if fewshot_cfg["pool"] == "train" else ""))
            continue
        for draw_seed in range(seed, seed + fewshot_cfg["seeds"]):
            fit = fit_fewshot(params, method=method, pool=pool, test=data.test, k=k, seed=draw_seed,
                              head_cfg=head_cfg, n_classes=len(job.class_names))
            rows.append(result_row(kind="fewshot", method=method, feature_set=feature_set, data=data, fit=fit,
                                   model=fit.model, hyperparams=params, job=job, draw_seed=draw_seed,
                                   k_per_class=k, n_train=fit.n_train, n_val=0, n_fit=fit.n_train,
                                   n_fit_rows=fit.n_train, fit_on=fewshot_cfg["pool"]))
    save_rows(head_dir, rows)
    return rows


def result_row(*, kind: str, method: str, feature_set: str, data: HeadData, fit, model, hyperparams: dict,
               job: HeadJob, draw_seed: int | None = None, **fields) -> ResultRow:
    """One head's row: ``fit`` (a HeadFit or FewShotFit) scored on test; ``fields`` are the row's own."""
    fs = job.fs
    # A few-shot fit's bootstrap draws with its draw seed, so each draw's interval is its own.
    metrics = evaluate(data.test.y, fit.test_pred, fit.test_scores, n_classes=len(job.class_names),
                       n_boot=job.n_boot, seed=job.seed if draw_seed is None else draw_seed)
    n_train = int(len(np.unique(data.train.sample_id)))
    defaults = {"n_train": n_train, "n_val": int(len(data.val)), "n_fit": n_train + int(len(data.val)),
                "n_fit_rows": int(len(data.train) + len(data.val_fit))}
    return ResultRow(
        kind=kind, backbone=job.backbone, method=method, feature_set=feature_set, split_seed=job.seed,
        draw_seed=draw_seed, metrics=Metrics.from_dict(metrics), tta=fs.spec.get("tta", "none"),
        test_sample_id=tuple(data.test.sample_id.tolist()), test_pred=tuple(fit.test_pred.tolist()),
        hyperparams=hyperparams, cache_key=fs.key, manifest_hash=job.manifest_hash, n_test=int(len(data.test)),
        class_names=tuple(job.class_names), trainable_params=count_parameters(model),
        # The compute share of the stored rows this head read (every split's clean and mirrored views, and
        # the augmented views of train/val for 'aug'), as a fine-tune is charged the rows it read: the report
        # compares the arms on total cost, not on the sweep alone.
        costs=Costs(train_s=fit.train_s, predict_s=fit.predict_s, feature_s=fs.cost_s(rows_read(fs, feature_set))),
        # Augmented views per training image the head was fit on (0: clean only), counted from its rows.
        views=int(len(data.train) // max(n_train, 1)) - 1,
        git_sha=git_sha(), **{**defaults, **fields})


def rows_read(fs, feature_set: str) -> np.ndarray:
    """The feature rows a head of ``feature_set`` reads: clean and test-time views, plus augmented ones for 'aug'."""
    view = np.asarray(fs.view)
    return (view <= 0) | (feature_set == "aug")


def head_meta(row: ResultRow, job: HeadJob) -> dict:
    """What predict needs beside the fitted pipeline: which backbone made its features, and its classes."""
    fs = job.fs
    # No one backbone's pooled output made these features: predict refuses such a head.
    fused = "fused" in fs.spec or "stages" in fs.spec
    return {"backbone": job.backbone,
            "backbone_spec": None if fused else backbone_spec_of(fs.spec, job.backbone),
            "features_spec": fs.spec, "cache_key": fs.key, "class_names": list(job.class_names),
            "method": row.method, "feature_set": row.feature_set, "hyperparams": row.hyperparams,
            "manifest_hash": job.manifest_hash, "seed": row.split_seed}


def backbone_spec_of(features_spec: dict, backbone: str) -> dict:
    """The backbone part of a feature cache's spec (what predict compares with the loaded backbone)."""
    spec = features_spec.get("backbone")
    if isinstance(spec, dict):
        return spec
    raise ValueError(f"the feature cache spec for {backbone} has no 'backbone' table (keys: {sorted(features_spec)}); "
                     "it was written by an older extract stage: rerun it")
