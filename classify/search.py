"""The head arm's search: one tuner study per (backbone or fusion, split seed) over every head and feature set.

Each of ``tune.trials`` trials (study/tune.py) draws a method among ``classify.heads``, a feature set among those
built for this backbone, and that method's settings from ``[tune.head]``; it fits the pipeline on train and is
scored on clean val (mean per-class accuracy). The chosen trial (study/protocol.py ``choose_trial``) is refit on
train+val and scores test once; no test row reaches a fit or a choice. ``heads/<key>/`` holds the fitted pipeline,
its meta.json, the row (``rows.jsonl``) and the trials (``trials.json``): a rerun of the same search re-appends
them without fitting.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import sklearn
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold

from classify.heads import class_scores, count_parameters, make_pipeline, used_settings
from classify.selection import HeadData, concat
from classify.store import FORMAT_VERSION, cached_rows, save_head, save_rows
from study import tune
from study.atomic import file_lock, write_text_atomic
from study.hashing import spec_hash
from study.metrics import evaluate, mean_per_class_accuracy
from study.protocol import choose_trial
from study.provenance import git_sha
from study.results import Costs, Metrics, Point, ResultRow, Selection, TrialRow

log = logging.getLogger("study.classify")
TRIALS_FILE = "trials.json"
_METHOD_AXES = {"lr": ("lr_C",), "svm": ("svm_C", "svm_kernel"), "knn": ("knn_k", "knn_metric", "knn_weights")}


@dataclass(frozen=True)
class HeadJob:
    """What every head of one feature set shares: where its rows come from and how it is scored."""
    backbone: str  # a backbone name, or "fused:a+b"
    fs: object  # extract.cache.FeatureSet (its identity, spec and per-row costs; the features may be stripped)
    seed: int  # the split seed
    n_boot: int
    class_names: tuple[str, ...]
    manifest_hash: str


@dataclass(frozen=True)
class HeadSearch:
    """One head study's inputs: a backbone's (or fusion's) feature sets as head rows, and their FeatureSets. A
    few-shot search (``fewshot`` = (k, draw seed)) trains on k drawn images per class and refits on them alone."""
    backbone: str
    data: dict  # feature set name -> HeadData (built once, in the process that read the store)
    jobs: dict  # feature set name -> HeadJob
    fewshot: tuple[int, int] | None = None

    def row_fields(self, data: HeadData) -> dict:
        """The fields that tell a few-shot row from a full one (what it was fit on, its k and draw)."""
        if self.fewshot is None:
            return {"kind": "head", "fit_on": "train+val"}
        n = int(len(np.unique(data.train.sample_id)))
        return {"kind": "fewshot", "fit_on": "train", "k_per_class": self.fewshot[0], "draw_seed": self.fewshot[1],
                "n_fit": n}


# ---------------------------------------------------------------------------------------------- a trial


def point_of(params: dict) -> tuple[str, str, dict]:
    """(method, feature set, pipeline settings) of a trial's parameters (classify.heads.make_pipeline's point)."""
    method = params["method"]
    point = {"power": params["power"], "norm": params["norm"], "pca": 0}
    if method == "lr":
        point["C"] = params["lr_C"]
    elif method == "svm":
        point.update(C=params["svm_C"], kernel=params["svm_kernel"])
    else:
        point.update(k=params["knn_k"], metric=params["knn_metric"], weights=params["knn_weights"])
    return method, params["feature_set"], point


def _suggest(trial, space: dict, *, methods: list[str], feature_sets: list[str]) -> dict:
    method = trial.suggest_categorical("method", methods)
    params = {"method": method, "feature_set": trial.suggest_categorical("feature_set", feature_sets)}
    for name in ("norm", "power", *_METHOD_AXES[method]):
        params[name] = space[name].suggest(trial)
    return params


def _objective(search: HeadSearch, *, space: dict, methods: list[str], solver: dict, folds: int):
    """A trial's score: its val mean per-class accuracy, or (``folds`` > 1: val is too small to choose by) its
    stratified ``folds``-fold cross-validated one on train+val; the val score is kept beside it either way."""
    def objective(trial) -> tune.Outcome:
        method, feature_set, point = point_of(_suggest(trial, space, methods=methods, feature_sets=list(search.data)))
        data, seed = search.data[feature_set], search.jobs[feature_set].seed
        model = make_pipeline(method, point, seed=seed, head_cfg=solver,
                              n_rows=len(data.train)).fit(data.train.X, data.train.y)
        val = mean_per_class_accuracy(data.val.y, model.predict(data.val.X))
        loss = float(log_loss(data.val.y, model.predict_proba(data.val.X), labels=model[-1].classes_)) \
            if hasattr(model[-1], "predict_proba") else None
        if folds > 1:
            cv = cv_score(method, point, data, seed=seed, solver=solver, folds=folds)
            return tune.Outcome(val=cv, attrs={"val": val, "cv": cv})
        return tune.Outcome(val=val, val_log_loss=loss)
    return objective


# Val images per class below which the head arm chooses by cross-validation on train+val (issue: 5 val images per
# class tie often and cannot rank several families); a saturated val is re-ranked the same way.
CV_BELOW = 10


def cv_folds(search: HeadSearch) -> int:
    """The folds of the cross-validation a search chooses by: 0 (choose on val) when val has at least CV_BELOW
    images of every class, else up to 5, as many as the smallest class's train+val images allow (0 below 2)."""
    data = next(iter(search.data.values()))
    n = int(max(data.train.y.max(initial=0), data.val.y.max(initial=0))) + 1
    counts = np.bincount(data.val.y, minlength=n)[np.unique(data.train.y)] if len(data.val) else np.zeros(1, int)
    if counts.min() >= CV_BELOW:
        return 0
    return _possible_folds(data)


def _possible_folds(data: HeadData) -> int:
    rows = concat(data.train, data.val_fit)
    _, first = np.unique(rows.sample_id, return_index=True)
    smallest = int(np.bincount(rows.y[first])[np.unique(rows.y[first])].min())
    return min(5, smallest) if smallest >= 2 else 0


def cv_score(method: str, point: dict, data: HeadData, *, seed: int, solver: dict, folds: int) -> float:
    """Mean per-class accuracy of ``point`` under stratified ``folds``-fold cross-validation over the train+val
    images: each fold fits on the other images' rows (their augmented views too) and scores its images' clean
    rows. Test takes no part."""
    rows = concat(data.train, data.val_fit)
    ids, first = np.unique(rows.sample_id, return_index=True)  # an image's first row is its clean (view 0) row
    labels = rows.y[first]
    scores = []
    for keep, held in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(first, labels):
        fit = ~np.isin(rows.sample_id, ids[held])
        model = make_pipeline(method, point, seed=seed, head_cfg=solver, n_rows=int(fit.sum()))
        model.fit(rows.X[fit], rows.y[fit])
        scores.append(mean_per_class_accuracy(labels[held], model.predict(rows.X[first[held]])))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------- the study


def search_key(search: HeadSearch, *, cfg: dict, tune_cfg: dict) -> str:
    """What the search's numbers depend on: the content identity of every feature set it may read, what it may
    try, its budget and seed, how it is scored, and scikit-learn's version."""
    job = next(iter(search.jobs.values()))
    return spec_hash({"kind": "head-search", "features": {name: j.fs.key for name, j in search.jobs.items()},
                      # A few-shot search trains on its draw: which images (by content) are in its key.
                      **({"fewshot": list(search.fewshot), "drawn": spec_hash(sorted(
                          map(str, next(iter(search.data.values())).train.sample_id)))} if search.fewshot else {}),
                      "methods": list(cfg["heads"]), "space": tune_cfg["head"], "solver": cfg["lr"],
                      "tune": {k: tune_cfg[k] for k in ("trials", "sampler", "startup_trials", "seed")},
                      "seed": job.seed, "n_boot": job.n_boot, "sklearn": sklearn.__version__,
                      "format": FORMAT_VERSION})


def search_heads(search: HeadSearch, *, cfg: dict, tune_cfg: dict, out_dir: Path,
                 heads_dir: Path) -> tuple[list[ResultRow], list[TrialRow]]:
    """The head arm's row and trials for one backbone (reused from ``heads/<key>/`` when this search finished)."""
    key = search_key(search, cfg=cfg, tune_cfg=tune_cfg)
    # The study goes on with a larger budget (its first trials are the smaller budget's); the row's key changes.
    head_dir = Path(heads_dir) / key
    name = "head-" + search_key(search, cfg=cfg, tune_cfg={**tune_cfg, "trials": 0})[:24]
    # One search per head folder at a time: a second study on this --out waits, then reuses the finished head.
    with file_lock(Path(heads_dir) / f".{key}.lock", what=f"searching the heads of {search.backbone}"):
        cached = _cached(head_dir)
        if cached is not None:
            log.info("%s heads: reusing %s", search.backbone, head_dir)
            return cached
        space = tune.parse_space(tune_cfg["head"], integers=tune.HEAD_INTEGERS)
        tune_dir = Path(out_dir) / "tune"
        study = tune.open_study(name=name, cfg=tune_cfg, tune_dir=tune_dir)
        folds = cv_folds(search)
        tune.run_trials(study, _objective(search, space=space, methods=list(cfg["heads"]), solver=cfg["lr"],
                                          folds=folds),
                        trials=tune_cfg["trials"], lock=tune.budget_lock(tune_dir, name),
                        stale_after_s=tune_cfg["stale_after_s"])
        trials = tune.finished(study, limit=tune_cfg["trials"])
        row = _refit_chosen(search, trials=trials, solver=cfg["lr"], head_dir=head_dir, key=key, folds=folds)
        records = trial_rows(search, trials, space=space, study=name)
        write_text_atomic(head_dir / TRIALS_FILE, json.dumps([t.to_dict() for t in records]))
        save_rows(head_dir, [row])  # written last: a folder without it is an unfinished search
        return [row], records


def cached_search(search: HeadSearch, *, cfg: dict, tune_cfg: dict,
                  heads_dir: Path) -> tuple[list[ResultRow], list[TrialRow]] | None:
    """The row and trials of this search when it finished before (no lock: its rows are written last, atomically),
    else None -- so a rerun with nothing to fit starts no worker process."""
    return _cached(Path(heads_dir) / search_key(search, cfg=cfg, tune_cfg=tune_cfg))


def _cached(head_dir: Path) -> tuple[list[ResultRow], list[TrialRow]] | None:
    rows = cached_rows(head_dir)
    if rows is None or not (head_dir / TRIALS_FILE).is_file():
        return None
    try:
        return rows, [TrialRow.from_dict(t) for t in json.loads((head_dir / TRIALS_FILE).read_text())]
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s is unreadable (%s): the search is finished again", head_dir / TRIALS_FILE, exc)
        return None


def _choose(search: HeadSearch, complete: list, *, solver: dict, folds: int) -> tuple[int, str, dict]:
    """(index of the chosen trial, the metric that chose it, cross-validated scores by trial number). On val unless
    val is too small (``folds``: the trials were scored by cross-validation), or saturated, or tied across
    methods: then the trials tied at the best val are re-ranked by cross-validation on train+val."""
    if folds > 1:
        return choose_trial(complete), f"{folds}-fold cross-validation on train+val (val < {CV_BELOW} per class)", {}
    best = complete[choose_trial(complete)]
    tied = [t for t in complete if t.val == best.val]
    saturated = best.val >= 1.0 - 1e-12
    if not saturated and len({t.params["method"] for t in tied}) < 2:
        return complete.index(best), "val_mean_per_class", {}
    cv = {}
    for t in tied:
        method, feature_set, point = point_of(t.params)
        data = search.data[feature_set]
        if _possible_folds(data) > 1:
            cv[t.number] = cv_score(method, point, data, seed=search.jobs[feature_set].seed, solver=solver,
                                    folds=_possible_folds(data))
    if not cv:
        return complete.index(best), "val_mean_per_class (saturated; too few images to cross-validate)", {}
    ranked = [SimpleNamespace(val=cv[t.number], seconds=t.seconds, number=t.number) for t in tied if t.number in cv]
    winner = ranked[choose_trial(ranked)].number
    why = "val saturated" if saturated else "val tied across methods"
    return next(i for i, t in enumerate(complete) if t.number == winner), f"cross-validation on train+val ({why})", cv


def _refit_chosen(search: HeadSearch, *, trials: list, solver: dict, head_dir: Path, key: str,
                  folds: int) -> ResultRow:
    """The chosen trial's pipeline refit on train+val (a few-shot search: on its draw alone), then -- and only
    then -- test predicted once."""
    complete = [t for t in trials if t.state == "COMPLETE"]
    t_choose = time.perf_counter()
    index, metric, cv = _choose(search, complete, solver=solver, folds=folds)
    choose_s = time.perf_counter() - t_choose  # a re-ranking by cross-validation fits models too
    chosen = complete[index]
    method, feature_set, point = point_of(chosen.params)
    data, job = search.data[feature_set], search.jobs[feature_set]
    # The chosen trial's model (fit on train) again, for its val predictions: what a paired comparison on val reads.
    val_pred = make_pipeline(method, point, seed=job.seed, head_cfg=solver,
                             n_rows=len(data.train)).fit(data.train.X, data.train.y).predict(data.val.X)
    t0 = time.perf_counter()
    rows = concat(data.train, data.val_fit)
    model = make_pipeline(method, point, seed=job.seed, head_cfg=solver, n_rows=len(rows)).fit(rows.X, rows.y)
    refit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = class_scores(model, data.test.X, n_classes=len(job.class_names))
    predict_s = time.perf_counter() - t1  # one pass over test, as a fine-tune's; the labels below are bookkeeping
    pred = np.asarray(model.predict(data.test.X), dtype=np.int64)
    fit = _Scored(test_pred=pred, test_scores=scores, train_s=sum(t.seconds for t in trials) + choose_s + refit_s,
                  predict_s=predict_s)
    # A point's val score is its val score, whatever chose (a cross-validated score is kept beside it).
    points = [Point(params=t.params, val_mean_per_class=t.attrs.get("val", t.val), val_log_loss=t.val_log_loss,
                    extra={"trial": t.number, "seconds": t.seconds,
                           **({"cv": t.attrs.get("cv", cv.get(t.number))} if folds > 1 or t.number in cv else {})})
              for t in complete]
    row = result_row(method=method, feature_set=feature_set, data=data, fit=fit, model=model, hyperparams=point,
                     job=job, selection=Selection(points=tuple(points), chosen=index, metric=metric),
                     val_mean_per_class=points[index].val_mean_per_class, keys={"head_key": key},
                     **search.row_fields(data),
                     val_sample_id=tuple(data.val.sample_id.tolist()), val_pred=tuple(int(p) for p in val_pred),
                     feature_s=search_feature_s(search))
    save_head(head_dir, model=model, meta=head_meta(row, job))
    log.info("%s heads: %d trials -> %s %s %s, val %.4f (chosen by %s) -> test mean per-class %.4f",
             search.backbone, len(trials), method, feature_set, point, row.val_mean_per_class, metric,
             row.metrics.mean_per_class)
    return row


@dataclass(frozen=True)
class _Scored:
    test_pred: np.ndarray
    test_scores: np.ndarray
    train_s: float
    predict_s: float


def trial_rows(search: HeadSearch, trials: list, *, space: dict, study: str) -> list[TrialRow]:
    seed = next(iter(search.jobs.values())).seed
    return [TrialRow(arm="head", backbone=search.backbone, split_seed=seed, number=t.number, state=t.state,
                     params=t.params, val_mean_per_class=t.attrs.get("val", t.val), val_log_loss=t.val_log_loss,
                     seconds=t.seconds, study=study, cv=t.attrs.get("cv"),
                     at_edge=tuple(k for k, v in t.params.items() if k in space and space[k].at_edge(v)))
            for t in trials]


# ---------------------------------------------------------------------------------------------- rows


def result_row(*, method: str, feature_set: str, data: HeadData, fit, model, hyperparams: dict, job: HeadJob,
               kind: str = "head", draw_seed: int | None = None, feature_s: float | None = None, **fields) -> ResultRow:
    """One head's row: ``fit`` (test predictions and scores, seconds) scored on test; ``feature_s`` the compute
    share of the stored rows it is charged (None: those of ``feature_set``); ``fields`` are the row's own."""
    fs = job.fs
    feature_s = fs.cost_s(rows_read(fs, feature_set)) if feature_s is None else feature_s
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
        hyperparams=used_settings(hyperparams, model), cache_key=fs.key, manifest_hash=job.manifest_hash,
        n_test=int(len(data.test)),
        class_names=tuple(job.class_names), trainable_params=count_parameters(model),
        # The compute share of the stored rows this head read (every split's clean and mirrored views, and
        # the augmented views of train/val for 'aug'), as a fine-tune is charged the rows it read: the report
        # compares the arms on total cost, not on the fits alone.
        costs=Costs(train_s=fit.train_s, predict_s=fit.predict_s, feature_s=feature_s),
        # Augmented views per training image the head was fit on (0: clean only), counted from its rows.
        views=int(len(data.train) // max(n_train, 1)) - 1,
        git_sha=git_sha(), **{**defaults, **fields})


def search_feature_s(search: HeadSearch) -> float | None:
    """The compute share of every stored row a search read: its trials fit on every feature set it offers, so it
    is charged all of their rows of the images it uses (a few-shot search: its draw, val and test), each
    (image, view) once ('stages' reads the pooled rows 'clean' reads, and one pass made both parts)."""
    cost = {}
    for name, job in search.jobs.items():
        fs = job.fs
        if fs.row_cost_s is None:
            return None
        d = search.data[name]  # a few-shot search read its drawn train images only (and val, test)
        seen = np.concatenate([d.train.sample_id, d.val_fit.sample_id, d.val.sample_id, d.test.sample_id])
        read = rows_read(fs, name) & np.isin(np.asarray(fs.sample_id), seen)
        cost.update(zip(zip(np.asarray(fs.sample_id)[read].tolist(), np.asarray(fs.view)[read].tolist()),
                        np.asarray(fs.row_cost_s)[read].tolist()))
    return float(sum(cost.values()))


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

