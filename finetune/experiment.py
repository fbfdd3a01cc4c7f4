"""One fine-tuning experiment (backbone x unfreeze policy) from manifest to results rows: chosen on val and
refit on train+val like the heads (classify/selection.py), cached by spec hash.

The protocol:

1. every point of the policy's grid (``finetune.grid``: lr x backbone_lr_mult x ...) trains on train and is
   scored on val after every epoch; its val score is its best epoch's (early stopping after ``patience``
   epochs without a better one);
2. the chosen point has the best val score (ties: lower val log-loss at that epoch, then the earlier point);
3. the chosen point is refit on train+val with its hyperparameters for its best epoch count (nothing is
   evaluated, no early stopping; the cached path reads val images' views 0..V like train's);
4. that model scores test once. No test row is read (no test image decoded) before it is trained.

``probe+last:k`` (freeze, then unfreeze) runs two phases per grid point: phase 1 trains the new head alone
on the frozen network (the ``head`` policy: pooled features) until val stops improving; phase 2 starts from
phase 1's best head and trains the last k units (``last:k``: the cut activations). The point's val score is
phase 2's; its refit repeats both phases on train+val for their chosen epoch counts.

Layout: every training run ("fit": one one-phase policy, one setting, one fit set, one starting head)
lives in ``finetune_dir/fits/<fit key>/`` (``last.pt`` to resume, ``best.pt`` the kept epoch), so a fit
that two policies or two grids share (``head``'s points are ``probe+last:k``'s phase 1) trains once.
``finetune_dir/<run key>/`` holds ``spec.json`` and ``rows.json`` (the finished run's results rows): a rerun
of the same spec, grid included, re-appends those rows without reading activations or training.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataset.manifest import class_names, manifest_hash, read_manifest
from dataset.transforms import policy_spec
from extract.blocks import parse_policy
from extract.store import FORMAT_VERSION, library_versions
from finetune.checkpoint import read_checkpoint, save_checkpoint
from finetune.config import GRID_AXES, RECIPE_KEYS, ROW_KEYS
from finetune.inputs import FitInputs, StoreAccess, stores_for
from finetune.model import build_split_net, count_params
from finetune.train import FitResult, NotFinished, Trainer
from study import distributed
from study.atomic import file_lock, write_text_atomic
from study.hashing import spec_hash
from study.metrics import evaluate, mean_per_class_accuracy
from study.precision import resolve_precision
from study.protocol import choose
from study.provenance import git_sha
from study.results import Costs, Metrics, Point, ResultRow, Selection, read_rows, rows_text

log = logging.getLogger(__name__)
# The layout and key format of finetune/ (2: a grid chosen on val, refit on train+val, fits/<key>/).
FIT_FORMAT = 2
# Keys of the [finetune] section that do not change a fit's numbers (so they stay out of its key).


# ---------------------------------------------------------------------------------------------- the grid


def grid_points(hp: dict, policy: str) -> list[dict]:
    """The settings ``policy`` tries on val: the cartesian product of ``hp["grid"]``'s axes (in GRID_AXES
    order, each axis in its declared order), each point naming its lr (and backbone_lr_mult) even when the
    grid does not sweep them. ``backbone_lr_mult`` is not swept for ``head``: no trunk parameter trains."""
    trunk_trains = parse_policy(policy).last != 0
    axes = {"lr": [hp["lr"]], **({"backbone_lr_mult": [hp["backbone_lr_mult"]]} if trunk_trains else {})}
    for axis in GRID_AXES:
        if axis in hp["grid"] and (trunk_trains or axis != "backbone_lr_mult"):
            axes[axis] = list(hp["grid"][axis])
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def phase_params(point: dict, train_policy: str) -> dict:
    """A grid point's settings that change ``train_policy``'s training (phase 1 of a probe: no trunk mult)."""
    return {k: v for k, v in point.items() if not (train_policy == "head" and k == "backbone_lr_mult")}


# ---------------------------------------------------------------------------------------------- fits


@dataclass
class _Fit:
    key: str
    policy: str  # one-phase policy
    params: dict
    result: FitResult
    trainer: Trainer

    @property
    def head(self) -> dict:
        return self.trainer.net.head_state()


def keyed(hp: dict, keys: tuple[str, ...] = ROW_KEYS) -> dict:
    """The fields of ``hp`` that change the numbers (declared in finetune/config.py): what a key is built from,
    whatever else ``hp`` carries (run settings, a name, keys a newer config added)."""
    return {k: hp[k] for k in keys}


class _Experiment:
    def __init__(self, *, backbone, manifest, hp, seed, device, finetune_dir: Path, rows: FitInputs, base: dict,
                 on_epoch_end, resume_only: bool = False):
        self.backbone, self.manifest, self.hp, self.seed, self.device = backbone, manifest, hp, seed, device
        self.finetune_dir, self.rows, self.base, self.on_epoch_end = Path(finetune_dir), rows, base, on_epoch_end
        self.resume_only = resume_only  # finished fits only: never train (finetune.train.NotFinished)
        self.n_classes = len(class_names(manifest))
        self._fits: dict[str, _Fit] = {}

    def fit_spec(self, *, policy: str, params: dict, fit_on: str, epochs: int | None, init: str | None) -> dict:
        hp = keyed({**self.hp, **params}, RECIPE_KEYS)
        if policy == "head":
            hp.pop("backbone_lr_mult")  # no trunk trains
        parts = ("train", "val") if fit_on == "train" else (fit_on,)
        return {**self.base, "unit": "fit", "policy": policy, "hyperparams": hp, "fit_on": fit_on, "epochs": epochs,
                "init": init, "path": "prefix_cache" if self.rows.cached(policy) else "naive",
                "inputs": self.rows.identity(policy, parts)}

    def fit(self, *, policy: str, params: dict, fit_on: str = "train", epochs: int | None = None,
            init: _Fit | None = None) -> _Fit:
        """One training run, resumable (``last.pt``) and reused when already done (here or by another policy)."""
        spec = self.fit_spec(policy=policy, params=params, fit_on=fit_on, epochs=epochs,
                             init=init.key if init else None)
        key = spec_hash(spec)
        if key in self._fits:
            return self._fits[key]
        hp = {**self.hp, **params}
        net = build_split_net(self.backbone, policy=policy, n_classes=self.n_classes, dropout=hp["dropout"],
                              seed=self.seed)
        if init is not None:
            net.load_head_state(init.head)  # phase 2 starts from phase 1's kept head
        fit_dir = self.finetune_dir / "fits" / key
        if distributed.is_main():
            fit_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(fit_dir / "spec.json", json.dumps(spec, indent=2, sort_keys=True))
        distributed.barrier()
        name = f"{self.backbone.name} {policy} {params}" + (" refit" if fit_on != "train" else "")
        trainer = Trainer(net=net, hp={**hp, "name": name}, seed=self.seed, device=self.device, ckpt_dir=fit_dir,
                          run_key=key)
        # One writer per fit: a second study on this --out waits, then resumes the finished last.pt at once.
        lock = file_lock(fit_dir.parent / f".{key}.lock", what=f"training {name}") if distributed.is_main() \
            else contextlib.nullcontext()
        with lock:
            if fit_on == "train":
                result = trainer.fit(self.rows.source(policy, "train"), self.rows.source(policy, "val"),
                                     on_epoch_end=self.on_epoch_end, resume_only=self.resume_only)
            else:
                result = trainer.fit_fixed(self.rows.source(policy, fit_on), epochs=epochs,
                                           on_epoch_end=self.on_epoch_end, resume_only=self.resume_only)
        self._fits[key] = fit = _Fit(key=key, policy=policy, params=params, result=result, trainer=trainer)
        return fit

    def select(self, policy: str, point: dict) -> list[_Fit]:
        """A grid point trained on train, scored on val: its fits in phase order (the last one is scored)."""
        phases, fits = parse_policy(policy).phases, []
        for phase in phases:
            fits.append(self.fit(policy=phase, params=phase_params(point, phase), init=fits[-1] if fits else None))
        return fits

    def refit(self, policy: str, point: dict, chosen: list[_Fit]) -> list[_Fit]:
        """The chosen point's phases again on train+val, each for the epoch count val chose for it."""
        fits = []
        for phase, fit in zip(parse_policy(policy).phases, chosen):
            fits.append(self.fit(policy=phase, params=phase_params(point, phase), fit_on="train+val",
                                 epochs=fit.result.best_epoch + 1, init=fits[-1] if fits else None))
        return fits


# ---------------------------------------------------------------------------------------------- the run


def experiment_inputs(*, backbone, phases, manifest, hp: dict, seed: int, device: str, store: StoreAccess,
                      data_root: Path, rebuild: bool = False) -> tuple[FitInputs, dict]:
    """The rows a fine-tune's phases read (their store entries made whole) and the key fields every fit shares."""
    # The cached path wherever the policy has a frozen prefix (``all`` and last:k >= n_units read images).
    n_classes = len(class_names(manifest))
    with_prefix = [p for p in phases if hp["prefix_cache"]
                   and build_split_net(backbone, policy=p, n_classes=n_classes).prefix_names]
    stores = stores_for(backbone=backbone, policies=with_prefix, manifest=manifest, hp=hp, access=store,
                     data_root=data_root, rebuild=rebuild)
    rows = FitInputs(backbone=backbone, manifest=manifest, hp=hp, data_root=data_root, stores=stores,
                 view_seed=store.view_seed)
    base = {"kind": "finetune", "format": FORMAT_VERSION, "fit_format": FIT_FORMAT, "backbone": backbone.spec,
            "augment": policy_spec(hp["augment"]), "seed": seed, "manifest_hash": manifest_hash(manifest),
            # What "auto" trains in here, and on what kind of device: a copied --out on a bf16 CPU or a GPU
            # trains anew instead of reusing fp32 CPU results.
            "precision": resolve_precision(hp["precision"], device), "device": torch.device(device).type,
            "versions": library_versions()}
    return rows, base


def run_spec(*, base: dict, policy: str, hp: dict, points: list[dict], inputs: dict) -> dict:
    """What a fine-tune's row depends on: the recipe, the grid it chose among, the content identity of every
    store row it reads (test included; None on the naive path), so changed activations redo what read them."""
    swept = {k for p in points for k in p}
    return {**base, "unit": "run", "policy": policy,
            "hyperparams": {k: v for k, v in keyed(hp).items() if k not in swept}, "grid": points,
            "inputs": inputs}


def run_finetune(*, backbone, policy: str, manifest_path: Path, data_root: Path, hp: dict, seed: int, device: str,
                 finetune_dir: Path, store: StoreAccess, rebuild: bool = False, on_epoch_end=None) -> list[ResultRow]:
    """Fine-tune ``backbone`` (extract.backbones.Backbone) with ``policy``: choose among its grid on val, refit
    on train+val, score test once; return its results rows (rank 0).

    The frozen prefix's activations come from the activation store (``store``); ``hp["views"]`` is an int."""
    run = _prepare(backbone=backbone, policy=policy, manifest_path=manifest_path, data_root=data_root, hp=hp,
                   seed=seed, device=device, finetune_dir=finetune_dir, store=store, rebuild=rebuild)
    cached = finished_rows(run.dir / ROWS_FILE) if not rebuild else None
    if cached is not None:
        log.info("finetune %s %s: cached result in %s", backbone.name, policy, run.dir)
        return cached if distributed.is_main() else []
    rows_path = run.dir / ROWS_FILE
    if distributed.is_main():
        run.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.dir / "spec.json", json.dumps(run.spec, indent=2, sort_keys=True))
    tried, best, final = _train(run, on_epoch_end=on_epoch_end)
    if not distributed.is_main():
        return []
    t1 = time.perf_counter()
    logits = final[-1].trainer.predict(run.rows.source(final[-1].policy, "test"))
    predict_s = time.perf_counter() - t1
    row = _row(run, tried=tried, best=best, final=final, logits=logits, predict_s=predict_s)
    _save_predictions(run, chosen=tried[best][-1], test_logits=logits)
    run.rows.release()
    write_text_atomic(rows_path, rows_text([row]))
    return [row]


def run_predictions(*, backbone, row: ResultRow, manifest_path: Path, data_root: Path, hp: dict, seed: int, device: str,
                    finetune_dir: Path, store: StoreAccess) -> dict | None:
    """The logits behind a finished fine-tune's row (rank 0; None on other ranks): ``val_logits`` of the chosen
    point's model trained on train (its kept epoch: what its val score was measured on), ``test_logits`` of the
    refit that scored test, with their ``*_labels`` and ``*_sample_id``. Read from the run's sealed
    ``predictions.pt``; when that is missing (a run finished before it was written) or damaged, recomputed
    from the run's kept models, which resume finished, so nothing trains again. Call it on every rank."""
    policy = row.hyperparams["policy"]
    run = _prepare(backbone=backbone, policy=policy, manifest_path=manifest_path, data_root=data_root, hp=hp,
                   seed=seed, device=device, finetune_dir=finetune_dir, store=store, rebuild=False)
    if run.key != row.keys.get("run_key"):
        raise ValueError(f"fine-tune {backbone.name} {policy}: this config makes run {run.key}, but the row came "
                         f"from run {row.keys.get('run_key')}; its predictions belong to that run's settings")
    path, found = run.dir / PREDICTIONS, None
    if distributed.is_main() and path.is_file():
        try:
            found = _checked_predictions(read_checkpoint(path), run=run, path=path, row=row)
        except Exception as exc:  # damaged, stale or of another layout: never used, recomputed (all ranks)
            log.warning("%s: %s; recomputing it from the run's kept models", path, exc)
    if distributed.broadcast_object(found is not None if distributed.is_main() else None):
        return found  # every rank agrees: nothing to recompute
    log.info("finetune %s %s: computing the predictions of the finished run %s", backbone.name, policy, run.dir)
    try:
        tried, best, final = _train(run, on_epoch_end=None, resume_only=True)
    except NotFinished as exc:
        raise NotFinished(f"fine-tune {backbone.name} {policy}: {exc}; delete {run.dir} and rerun to train it "
                          "again (its finished fits are reused)") from exc
    out, error = None, None
    if distributed.is_main():
        logits = final[-1].trainer.predict(run.rows.source(final[-1].policy, "test"))
        payload = _save_predictions(run, chosen=tried[best][-1], test_logits=logits)
        run.rows.release()
        try:
            out = _checked_predictions(payload, run=run, path=path, row=row)
        except ValueError as exc:
            error = f"{path}, recomputed from the run's kept models: {exc}"
    error = distributed.broadcast_object(error if distributed.is_main() else None)
    if error:  # raised on every rank alike, so none is left waiting in a collective
        raise ValueError(error)
    return out


# What ``_prepare`` resolves: a run's inputs (its store rows made whole), grid, spec and key; nothing trains.
@dataclass
class _Run:
    backbone: object
    policy: str
    manifest: object
    rows: FitInputs
    base: dict
    points: list[dict]
    inputs: dict
    spec: dict
    key: str
    dir: Path
    hp: dict
    seed: int
    device: str
    finetune_dir: Path


def _prepare(*, backbone, policy, manifest_path, data_root, hp, seed, device, finetune_dir, store, rebuild) -> _Run:
    manifest = read_manifest(manifest_path)
    phases = parse_policy(policy).phases
    rows, base = experiment_inputs(backbone=backbone, phases=phases, manifest=manifest, hp=hp, seed=seed,
                                   device=device, store=store, data_root=Path(data_root), rebuild=rebuild)
    points = grid_points(hp, policy)
    inputs = {p: rows.identity(p, ("train+val", "val", "test")) for p in phases}
    spec = run_spec(base=base, policy=policy, hp=hp, points=points, inputs=inputs)
    key = spec_hash(spec)
    return _Run(backbone=backbone, policy=policy, manifest=manifest, rows=rows, base=base, points=points,
                inputs=inputs, spec=spec, key=key, dir=Path(finetune_dir) / key, hp=hp, seed=seed, device=device,
                finetune_dir=Path(finetune_dir))


def _train(run: _Run, *, on_epoch_end, resume_only: bool = False):
    """Protocol steps 1-3 (fits already done resume finished; ``resume_only``: only those): every grid point on
    train scored on val, the best chosen, refit on train+val. Returns (tried, chosen index, refit fits)."""
    exp = _Experiment(backbone=run.backbone, manifest=run.manifest, hp=run.hp, seed=run.seed, device=run.device,
                      finetune_dir=run.finetune_dir, rows=run.rows, base=run.base, on_epoch_end=on_epoch_end,
                      resume_only=resume_only)
    tried = [exp.select(run.policy, point) for point in run.points]
    run.rows.release("train")  # every point has trained on it; the refit reads train+val, predictions val
    scores = [(fits[-1].result.best_score, fits[-1].result.best_log_loss) for fits in tried]
    best = choose(scores)
    log.info("finetune %s %s: val %s -> chose %s", run.backbone.name, run.policy,
             [round(s, 4) for s, _ in scores], run.points[best])
    final = exp.refit(run.policy, run.points[best], tried[best])
    run.rows.release("train+val")
    return tried, best, final


ROWS_FILE = "rows.json"  # a finished run's rows (JSON lines; runs before ResultRow wrote one JSON list)


def finished_rows(path: Path) -> list[ResultRow] | None:
    """A finished run's rows (``path``: its rows file), or None when it has none; an unreadable file is set aside
    (the run's finished fits resume at once, so nothing is trained twice) instead of stopping the study."""
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        raw = json.loads(text) if text.lstrip().startswith("[") else read_rows(path)
        return [ResultRow.from_dict(r) for r in raw]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("%s is unreadable (%s): the run is finished again from its kept fits", path, exc)
        if distributed.is_main():
            path.replace(path.with_suffix(".unreadable"))
        return None


PREDICTIONS = "predictions.pt"
PREDICTIONS_FORMAT = 1


def _save_predictions(run: _Run, *, chosen: _Fit, test_logits: np.ndarray) -> dict:
    """Seal the logits an ensemble of fine-tunes needs next to the row (finetune/ensemble.py); returns the payload."""
    val = run.rows.source(chosen.policy, "val")
    val_logits = chosen.trainer.predict(val)
    pos = run.rows.positions
    payload = {
        "run_key": run.key, "format": PREDICTIONS_FORMAT,
        "val_logits": torch.from_numpy(val_logits), "val_labels": val.labels.clone(),
        "val_sample_id": run.manifest["sample_id"].to_numpy()[pos["val"]].tolist(),
        "test_logits": torch.from_numpy(test_logits),
        "test_labels": torch.from_numpy(run.manifest["label"].to_numpy(np.int64)[pos["test"]]),
        "test_sample_id": run.manifest["sample_id"].to_numpy()[pos["test"]].tolist(),
    }
    save_checkpoint(run.dir / PREDICTIONS, payload)
    return payload


def _checked_predictions(payload: dict, *, run: _Run, path: Path, row: ResultRow) -> dict:
    """The predictions, if they are this run's, on this manifest's val and test rows, and the very models its row
    reports: their val score is the row's, their test argmax its predictions (else ``ValueError``)."""
    if payload.get("run_key") != run.key or payload.get("format") != PREDICTIONS_FORMAT:
        raise ValueError(f"it belongs to run {payload.get('run_key')} (format {payload.get('format')}), not "
                         f"{run.key} (format {PREDICTIONS_FORMAT})")
    out = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in payload.items()
           if k not in ("run_key", "format")}
    pos = run.rows.positions
    for split in ("val", "test"):
        ids = run.manifest["sample_id"].to_numpy()[pos[split]].tolist()
        labels = run.manifest["label"].to_numpy(np.int64)[pos[split]]
        if out[f"{split}_sample_id"] != ids or len(out[f"{split}_logits"]) != len(ids) \
                or not np.array_equal(out[f"{split}_labels"], labels):
            raise ValueError(f"its {split} rows are not this manifest's {split} split")
    val = mean_per_class_accuracy(out["val_labels"], out["val_logits"].argmax(1))
    if not math.isclose(val, row.val_mean_per_class, rel_tol=0, abs_tol=1e-9) \
            or tuple(out["test_logits"].argmax(1).tolist()) != row.test_pred:
        raise ValueError(f"its logits are not the models the row reports (val {val:.4f} vs the row's "
                         f"{row.val_mean_per_class:.4f}, or other test predictions)")
    return out


def _curve(fits: list[_Fit]) -> tuple[list[dict], int]:
    """The per-epoch history of a point's phases, numbered on (phase 2 after phase 1), and its kept epoch."""
    curve, offset = [], 0
    for n, fit in enumerate(fits, 1):
        extra = {"phase": n} if len(fits) > 1 else {}
        curve += [{**h, **extra, "epoch": h["epoch"] + offset} for h in fit.result.history]
        best = fit.result.best_epoch + offset
        offset += fit.result.epochs_run
    return curve, best


def _selection(points: list[dict], tried: list[list[_Fit]], best: int) -> Selection:
    """Every grid point with its best-epoch val score, the chosen one's curve (phases numbered on) and kept epoch."""
    out = []
    for point, fits in zip(points, tried):
        r = fits[-1].result
        out.append(Point(params=point, val_mean_per_class=r.best_score, val_log_loss=r.best_log_loss,
                         best_epoch=r.best_epoch, epochs_run=r.epochs_run, stopped_early=r.stopped_early,
                         extra={"probe_best_epoch": fits[0].result.best_epoch} if len(fits) > 1 else {}))
    curve, best_epoch = _curve(tried[best])
    return Selection(points=tuple(out), chosen=best, best_epoch=best_epoch, curve=tuple(curve),
                     stopped_early=tried[best][-1].result.stopped_early)


def _costs(*, policy: str, rows: FitInputs, tried: list[list[_Fit]], final: list[_Fit], predict_s: float) -> Costs:
    # A store hit costs nothing now but the pass was part of this result: charge its rows' recorded compute time
    # (probe+last:k reads two entries one shared pass filled, each charged the whole pass: count it once).
    prefix_s = max(rows.cost_s(p) for p in parse_policy(policy).phases)
    # Training cost: every distinct fit made on train (probe points share their phase 1) and the refit.
    select_s = sum({f.key: f.result.train_s for fits in tried for f in fits}.values())
    refit_s = sum(f.result.train_s for f in final)
    return Costs(train_s=select_s + refit_s + prefix_s, predict_s=predict_s, select_s=select_s, refit_s=refit_s,
                 prefix_cache_s=prefix_s, train_epochs_s=select_s + refit_s)


def _row(run: _Run, *, tried: list[list[_Fit]], best: int, final: list[_Fit], logits: np.ndarray,
         predict_s: float) -> ResultRow:
    rows, manifest, hp, policy = run.rows, run.manifest, run.hp, run.policy
    names = class_names(manifest)
    test = manifest.iloc[rows.positions["test"]].reset_index(drop=True)
    pred = logits.argmax(1)
    net, chosen = final[-1].trainer.net, tried[best]
    trainable, total = count_params(net)
    refit_epochs = [f.result.best_epoch + 1 for f in chosen]
    cached = all(rows.cached(p) for p in parse_policy(policy).phases)
    metrics = evaluate(test["label"].to_numpy(np.int64), pred, torch.softmax(torch.from_numpy(logits), 1).numpy(),
                       n_classes=len(names), n_boot=hp["n_boot"], seed=run.seed)
    return ResultRow(
        kind="finetune", backbone=run.backbone.name, method=f"ft:{policy}", feature_set=hp["augment"], tta=hp["tta"],
        split_seed=run.seed, metrics=Metrics.from_dict(metrics), test_sample_id=tuple(test["sample_id"].tolist()),
        test_pred=tuple(pred.tolist()),
        hyperparams={**keyed(hp), **run.points[best], "policy": policy,
                     "path": "prefix_cache" if cached else "naive", "trainable_units": net.suffix_names,
                     "best_epoch": chosen[-1].result.best_epoch,
                     "refit_epochs": refit_epochs if len(refit_epochs) > 1 else refit_epochs[0]},
        selection=_selection(run.points, tried, best),
        # The chosen point's val score (what the report chooses variants by); the scored model is the chosen point
        # refit on train+val for its chosen epoch count(s); its training views: the prefix cache reuses V fixed
        # augmented views every epoch, the naive loop draws fresh ones.
        val_mean_per_class=chosen[-1].result.best_score, fit_on="train+val", views=hp["views"] if cached else 0,
        views_fresh=not cached, costs=_costs(policy=policy, rows=rows, tried=tried, final=final, predict_s=predict_s),
        trainable_params=trainable, total_params=total, epochs_run=sum(f.result.epochs_run for f in chosen),
        cache_key=spec_hash(run.inputs) if cached else run.key,
        keys={"run_key": run.key, "fit_keys": [f.key for f in final]},
        manifest_hash=manifest_hash(manifest), n_train=len(rows.positions["train"]), n_val=len(rows.positions["val"]),
        n_fit=len(rows.positions["train+val"]), n_test=len(test), class_names=tuple(names), git_sha=git_sha())
