"""The classify stage: per backbone (and fused set), the head arm's tuner search over LR / SVM / kNN heads and
feature sets (classify/search.py), then the head arm's few-shot curve per backbone (classify/fewshot.py).

The feature sets come from the store entries the extract stage lists in ``<run>/features.json``. Each search
runs in its own worker process (``classify.n_jobs`` at a time); its row and trials are appended to the run's
``results.jsonl`` and ``trials.jsonl`` as they arrive, and a finished search's ``heads/<key>/`` is reused as is.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import joblib
from joblib import Parallel, delayed
from tqdm import tqdm

from classify.features import FEATURE_SETS, head_data
from classify.fewshot import drawn, largest_k
from classify.heads import blas_threads
from classify.search import HeadJob, HeadSearch, cached_search, search_heads
from dataset.manifest import class_names, manifest_hash, read_manifest
from study.console import bars_shown, console_level
from study.errors import StudyError
from study.protocol import curve_on_seed, draw_seeds, fewshot_backbones
from study.results import ResultRow, append_rows, append_skip, append_trials

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
    searches, sets_of = [], {}
    for backbone, fs in [*loaded.items(), *_fused_sets(cfg["fusions"], loaded, run_dir=ctx.run_dir)]:
        sets_of[backbone] = {"clean": fs, "aug": fs, **(extra.get(backbone) or {})}
        search = head_search(sets_of[backbone], backbone=backbone, manifest=manifest, cfg=cfg, seed=ctx.seed,
                             run_dir=ctx.run_dir)
        if search is not None:
            searches.append(search)
    rows = search_all(searches, cfg=cfg, tune_cfg=ctx.config["tune"], out_dir=Path(ctx.out_dir),
                      heads_dir=ctx.heads_dir, run_dir=Path(ctx.run_dir))
    log.info("classify: %d head rows appended to %s", len(rows), ctx.results_path)
    if curve_on_seed(ctx.config):
        singles = fewshot_backbones(ctx.config, [s.backbone for s in searches if s.backbone in loaded])
        draws = fewshot_searches([s for s in searches if s.backbone in singles], config=ctx.config,
                                 run_dir=Path(ctx.run_dir))
        few = search_all(draws, cfg=cfg, tune_cfg={**ctx.config["tune"], "trials": ctx.config["fewshot"]["trials"]},
                         out_dir=Path(ctx.out_dir), heads_dir=ctx.heads_dir, run_dir=Path(ctx.run_dir), trials=False)
        log.info("classify: %d few-shot head rows appended", len(few))


def fewshot_searches(searches: list[HeadSearch], *, config: dict, run_dir: Path) -> list[HeadSearch]:
    """Every (backbone, k, draw)'s few-shot head search; a k larger than a class's train images is a recorded
    skip."""
    out = []
    for search in searches:
        largest = largest_k(search)
        for k in config["fewshot"]["k"]:
            if k > largest:
                append_skip(run_dir, stage="classify", what=f"{search.backbone} few-shot k={k}",
                            reason=f"the smallest class has {largest} train images",
                            fix=f"lower fewshot.k to at most {largest}")
                continue
            out += [drawn(search, k=k, draw=draw) for draw in draw_seeds(config)]
    return out


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


def read_features_index(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "features.json"
    if not path.is_file():
        raise StudyError(f"no {path}: the classify stage reads the feature caches the extract stage lists "
                                "there; run the extract stage in the same run (--stages extract,classify)")
    return json.loads(path.read_text())


def head_search(sets: dict, *, backbone: str, manifest, cfg: dict, seed: int, run_dir: Path) -> HeadSearch | None:
    """The search of one backbone's (or fused set's) heads over the configured feature sets it has: each set's rows
    built once (a set that cannot be built is a recorded skip); None when no set is left."""
    data, jobs = {}, {}
    for name in [f for f in cfg["feature_sets"] if f in sets]:
        try:
            # Built once per feature set: it copies the features (and averages the mirror views in).
            data[name] = head_data(sets[name], manifest, feature_set=name if name in FEATURE_SETS else "clean")
        except ValueError as exc:
            append_skip(run_dir, stage="classify", what=f"{backbone} heads on {name}", reason=str(exc),
                        fix="set extract.views >= 1, or drop 'aug' from classify.feature_sets")
            continue
        # A search reads its HeadData; of the FeatureSet it keeps only the identity, spec and per-row costs, so a
        # worker process is not sent every stored feature again.
        fs = dataclasses.replace(sets[name], features=sets[name].features[:0])
        jobs[name] = HeadJob(backbone=backbone, fs=fs, seed=seed, n_boot=cfg["bootstrap"],
                             class_names=tuple(class_names(manifest)), manifest_hash=manifest_hash(manifest))
    return HeadSearch(backbone=backbone, data=data, jobs=jobs) if data else None


def n_workers(n_jobs: int, n_tasks: int) -> int:
    """Search processes: ``n_jobs``, or (0) one per usable CPU core (joblib's count, which reads the affinity
    mask and a container's CPU quota); never more than there are searches."""
    return max(1, min(n_jobs or joblib.cpu_count(), n_tasks))


def search_all(searches: list[HeadSearch], *, cfg: dict, tune_cfg: dict, out_dir: Path, heads_dir: Path,
               run_dir: Path, trials: bool = True) -> list[ResultRow]:
    """Run (or reuse) every backbone's head search, ``classify.n_jobs`` processes at a time, each with
    ``classify.blas_threads`` BLAS threads (one head's solver keeps about one core busy). Rows and trials are
    appended in search order as they arrive, so an interrupted stage loses only the searches in flight (each
    finished search is saved in its own folder, and its study's finished trials in the tuner's storage)."""
    # Finished searches are read here: a rerun with nothing to fit starts no worker process.
    done = [cached_search(s, cfg=cfg, tune_cfg=tune_cfg, heads_dir=heads_dir) for s in searches]
    todo = [s for s, d in zip(searches, done) if d is None]
    n = n_workers(cfg["n_jobs"], len(todo))
    log.info("classify: %d head searches of %d trials (%d finished before) on %d process(es)", len(searches),
             tune_cfg["trials"], len(searches) - len(todo), n if todo else 0)
    level = console_level()  # a worker prints what this process prints (not INFO under --quiet)
    fresh = iter(Parallel(n_jobs=n, return_as="generator")(
        delayed(_search_task)(s, cfg=cfg, tune_cfg=tune_cfg, out_dir=out_dir, heads_dir=heads_dir,
                              log_level=level if n > 1 else None) for s in todo) if todo else ())
    results = (d if d is not None else next(fresh) for d in done)  # in search order
    all_rows = []
    for rows, found in tqdm(results, total=len(searches), desc="head searches", unit="search",
                            disable=not bars_shown()):
        append_rows(run_dir / "results.jsonl", rows)
        if trials:  # the budget tables compare the main searches; a few-shot search's trials stay in its folder
            append_trials(run_dir, found)
        all_rows += rows
    return all_rows


def _search_task(search: HeadSearch, *, cfg: dict, tune_cfg: dict, out_dir: Path, heads_dir: Path,
                 log_level: int | None):
    if log_level is not None and not logging.getLogger().handlers:  # a fresh worker process: log as the study does
        logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S")
    with blas_threads(cfg["blas_threads"]):
        return search_heads(search, cfg=cfg, tune_cfg=tune_cfg, out_dir=out_dir, heads_dir=heads_dir)


