"""The fine-tune arm's search: one tuner study per (backbone, split seed), chosen on val, refit, scored once.

1. ``tune.trials`` trials (study/tune.py) each draw a policy among ``finetune.policies`` and a setting from
   ``[tune.finetune]`` (lr, trunk multiplier for policies that train blocks, weight decay, label smoothing,
   epochs), train on train and report val after every epoch; the pruner may stop a trial that falls behind;
2. the chosen trial has the best val score among the completed ones (study/protocol.py ``choose_trial``);
3. its fits (resumed finished from their checkpoints) are refit on train+val for their best epoch counts;
4. that model scores test once. No test row is read before it is trained.

``finetune_dir/<run key>/`` holds ``spec.json``, ``rows.json`` and ``trials.json`` (the finished search's row and
trials) and ``predictions.pt``: a rerun of the same spec re-appends them without reading activations or training.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dataset.manifest import class_names, manifest_hash, read_manifest
from extract.blocks import parse_policy
from finetune.checkpoint import read_checkpoint, save_checkpoint
from finetune.config import ROW_KEYS
from finetune.experiment import _Experiment, _Fit, experiment_inputs, keyed, trunk_trains
from finetune.inputs import FitInputs, StoreAccess
from finetune.model import PolicyNotApplicable, count_params, frozen_units
from finetune.train import NotFinished
from study import distributed, tune
from study.atomic import write_text_atomic
from study.errors import StudyError
from study.hashing import spec_hash
from study.metrics import evaluate, mean_per_class_accuracy
from study.protocol import choose_trial, draw_indices
from study.provenance import git_sha
from study.results import Costs, Metrics, Point, ResultRow, Selection, TrialRow, read_rows, rows_text

log = logging.getLogger(__name__)
ROWS_FILE, TRIALS_FILE = "rows.json", "trials.json"
SEARCH_FORMAT = 1  # bump when the search (its space, trials or choice) changes what a row holds
PREDICTIONS = "predictions.pt"
PREDICTIONS_FORMAT = 1


@dataclass(frozen=True)
class Searched:
    """A finished search: its result row (rank 0) and every trial it ran."""
    rows: list[ResultRow]
    trials: list[TrialRow]


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """What ``_prepare`` resolves: a search's inputs (its store rows made whole), space, spec and key."""
    backbone: object
    manifest: object
    policies: list[str]
    space: dict
    rows: FitInputs
    base: dict
    spec: dict
    key: str
    dir: Path
    hp: dict
    tune_cfg: dict
    tune_dir: Path
    seed: int
    device: str
    finetune_dir: Path
    fewshot: tuple[int, int] | None = None  # (k, draw seed) of a few-shot search

    @property
    def name(self) -> str:
        """The tuner study's name: the spec without the budget, so a larger budget goes on with the same study
        (its first trials are the smaller budget's) while the row's key changes."""
        tune_spec = {k: v for k, v in self.spec["tune"].items() if k != "trials"}
        return "ft-" + spec_hash({**self.spec, "tune": tune_spec})[:24]


def applicable(backbone, policies: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The policies this backbone can take, and (policy, reason) for the ones it cannot (more blocks than it has)."""
    ok, refused = [], []
    for policy in policies:
        try:
            frozen_units(backbone, policy)
            ok.append(policy)
        except PolicyNotApplicable as exc:
            refused.append((policy, str(exc)))
    return ok, refused


def _prepare(*, backbone, manifest_path, data_root, hp, tune_cfg, tune_dir, seed, device, finetune_dir, store,
             rebuild, fewshot: tuple[int, int] | None = None) -> _Run:
    manifest = read_manifest(manifest_path)
    policies, _ = applicable(backbone, list(hp["policies"]))
    if not policies:
        raise PolicyNotApplicable(f"no policy of {list(hp['policies'])} fits {backbone.name}")
    phases = list(dict.fromkeys(p for policy in policies for p in parse_policy(policy).phases))
    rows, base = experiment_inputs(backbone=backbone, phases=phases, manifest=manifest, hp=hp, seed=seed,
                                   device=device, store=store, data_root=Path(data_root), rebuild=rebuild)
    space = tune.parse_space(tune_cfg["finetune"], integers=tune.FINETUNE_INTEGERS)
    if fewshot is not None:
        rows.restrict_train(drawn_positions(manifest, rows.positions["train"], k=fewshot[0], draw=fewshot[1]))
    inputs = {p: rows.identity(p, ("train+val", "val", "test")) for p in phases}
    spec = search_spec(base=base, policies=policies, space=space, tune_cfg=tune_cfg, hp=hp, inputs=inputs)
    if fewshot is not None:  # its inputs name the drawn images' rows; k and the draw say which draw it is
        spec = {**spec, "fewshot": list(fewshot)}
    key = spec_hash(spec)
    return _Run(backbone=backbone, manifest=manifest, policies=policies, space=space, rows=rows, base=base, spec=spec,
                key=key, dir=Path(finetune_dir) / key, hp=hp, tune_cfg=tune_cfg, tune_dir=Path(tune_dir), seed=seed,
                device=device, finetune_dir=Path(finetune_dir), fewshot=fewshot)


def drawn_positions(manifest, train: np.ndarray, *, k: int, draw: int) -> np.ndarray:
    """The manifest positions of k train images per class, drawn as the head arm draws them (same seed, same
    images: ``study.protocol.draw_indices`` over the train images in manifest order)."""
    return train[draw_indices(manifest["label"].to_numpy(np.int64)[train], k=k, seed=draw)]


def search_spec(*, base: dict, policies: list[str], space: dict, tune_cfg: dict, hp: dict, inputs: dict) -> dict:
    """What a search's row depends on: the policies and the space it searches, its budget and sampler, the recipe's
    fixed fields (declared in finetune/config.py) and the content identity of every store row it reads."""
    return {**base, "unit": "search", "search_format": SEARCH_FORMAT, "policies": policies,
            "space": {k: asdict(v) for k, v in space.items()},
            "tune": {k: tune_cfg[k] for k in ("trials", "sampler", "startup_trials", "pruner", "seed")},
            "hyperparams": {k: v for k, v in keyed(hp, ROW_KEYS).items() if k not in space}, "inputs": inputs}


def run_finetune(*, backbone, manifest_path: Path, data_root: Path, hp: dict, tune_cfg: dict, tune_dir: Path,
                 seed: int, device: str, finetune_dir: Path, store: StoreAccess, rebuild: bool = False,
                 on_epoch_end=None, fewshot: tuple[int, int] | None = None) -> Searched:
    """Search ``backbone``'s fine-tunes (extract.backbones.Backbone) on val, refit the chosen one on train+val and
    score test once: its results row and trials (rank 0; other ranks get none). ``hp`` is the [finetune] section
    with ``views`` an int; the frozen prefix's activations come from the activation store (``store``)."""
    run = _prepare(backbone=backbone, manifest_path=manifest_path, data_root=data_root, hp=hp, tune_cfg=tune_cfg,
                   tune_dir=tune_dir, seed=seed, device=device, finetune_dir=finetune_dir, store=store,
                   rebuild=rebuild, fewshot=fewshot)
    cached = None if rebuild else finished(run)
    if cached is not None:
        log.info("finetune %s: cached result in %s", backbone.name, run.dir)
        return cached if distributed.is_main() else Searched([], [])
    if distributed.is_main():
        run.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.dir / "spec.json", json.dumps(run.spec, indent=2, sort_keys=True))
    exp = _experiment(run, on_epoch_end=on_epoch_end)
    trials = _search(run, exp)
    chosen, fits, final = _chosen(run, exp, trials)
    if not distributed.is_main():
        return Searched([], [])
    t1 = time.perf_counter()
    logits = final[-1].trainer.predict(run.rows.source(final[-1].policy, "test"))
    predict_s = time.perf_counter() - t1
    payload = _save_predictions(run, chosen=fits[-1], test_logits=logits)
    row = _row(run, trials=trials, chosen=chosen, fits=fits, final=final, logits=logits, predict_s=predict_s,
               val_logits=payload["val_logits"].numpy())
    run.rows.release()
    records = trial_rows(run, trials)
    write_text_atomic(run.dir / TRIALS_FILE, json.dumps([t.to_dict() for t in records]))
    write_text_atomic(run.dir / ROWS_FILE, rows_text([row]))
    return Searched([row], records)


def _experiment(run: _Run, *, on_epoch_end=None, resume_only: bool = False) -> _Experiment:
    return _Experiment(backbone=run.backbone, manifest=run.manifest, hp=run.hp, seed=run.seed, device=run.device,
                       finetune_dir=run.finetune_dir, rows=run.rows, base=run.base, on_epoch_end=on_epoch_end,
                       resume_only=resume_only)


# ---------------------------------------------------------------------------------------------- trials


def _suggest(trial, run: _Run) -> tuple[str, dict]:
    policy = trial.suggest_categorical("policy", run.policies)
    point = {name: p.suggest(trial) for name, p in run.space.items()
             if name != "backbone_lr_mult" or trunk_trains(policy)}
    return policy, point


def _reporter(trial, on_epoch_end):
    """Each epoch of a trial's scored phase: val to the tuner (and its pruner), a heartbeat, the caller's hook.
    Rank 0 decides whether to prune and tells the other ranks (``trial`` is None there), which train in step."""
    import optuna

    def report(epoch: int, stats: dict) -> None:
        prune = None
        if trial is not None:
            trial.report(stats["val_mean_per_class"], epoch)
            tune.beat(trial)
            prune = trial.should_prune()
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
        if distributed.broadcast_object(prune):
            raise optuna.TrialPruned()
    return report


def _max_epochs(space: dict) -> int:
    epochs = space["epochs"]
    return int(max(epochs.choices) if epochs.choices else epochs.high)


def _search(run: _Run, exp: _Experiment) -> list[tune.TrialRecord]:
    """Run the study's trials to its budget (resuming a study an earlier run began); its finished trials, on every
    rank. Rank 0 draws each trial and sends its setting to the other ranks, which train it in step (DDP)."""
    hook = exp.on_epoch_end

    def train(trial, policy: str, point: dict):
        fits = exp.select(policy, point, on_epoch_end=_reporter(trial, hook))
        exp.forget()  # a trial's networks go with it; the chosen one's fits resume from their checkpoints
        return fits[-1].result

    def objective(trial):
        policy, point = _suggest(trial, run)
        distributed.broadcast_object((policy, point))
        result = train(trial, policy, point)
        return tune.Outcome(val=result.best_score, val_log_loss=result.best_log_loss,
                            attrs={"best_epoch": result.best_epoch, "epochs_run": result.epochs_run})

    trials = None
    if distributed.is_main():
        study = tune.open_study(name=run.name, cfg=run.tune_cfg, tune_dir=run.tune_dir,
                                max_epochs=_max_epochs(run.space))
        tune.run_trials(study, objective, trials=run.tune_cfg["trials"], lock=tune.budget_lock(run.tune_dir, run.name),
                        stale_after_s=run.tune_cfg["stale_after_s"])
        distributed.broadcast_object(None)  # the budget is met: the other ranks stop waiting for settings
        trials = tune.finished(study, limit=run.tune_cfg["trials"])
    else:
        _follow(train)
    run.rows.release("train")  # every trial has trained on it; the refit reads train+val, predictions val
    return distributed.broadcast_object(trials)


def _follow(train) -> None:
    """A rank other than 0: train each setting rank 0 sends, until it sends None."""
    import optuna

    while (setting := distributed.broadcast_object(None)) is not None:
        try:
            train(None, *setting)
        except optuna.TrialPruned:
            continue


def _chosen(run: _Run, exp: _Experiment, trials: list[tune.TrialRecord]):
    """The chosen trial, its fits (finished: resumed from their checkpoints) and its refit on train+val."""
    complete = [t for t in trials if t.state == "COMPLETE"]
    if not complete:
        raise StudyError(f"fine-tune {run.backbone.name}: every one of its {len(trials)} trials was pruned; raise "
                         "tune.trials or set tune.pruner = \"none\"")
    chosen = complete[choose_trial(complete)]
    policy = chosen.params["policy"]
    point = {k: v for k, v in chosen.params.items() if k != "policy"}
    log.info("finetune %s: %d trials (%d pruned) -> chose trial %d %s, val %.4f", run.backbone.name, len(trials),
             len(trials) - len(complete), chosen.number, chosen.params, chosen.val)
    fits = exp.select(policy, point)
    final = exp.refit(policy, point, fits)
    run.rows.release("train+val")
    return chosen, fits, final


def trial_rows(run: _Run, trials: list[tune.TrialRecord]) -> list[TrialRow]:
    out = []
    for t in trials:
        edge = tuple(k for k, v in t.params.items() if k in run.space and run.space[k].at_edge(v))
        out.append(TrialRow(arm="finetune", backbone=run.backbone.name, split_seed=run.seed, number=t.number,
                            state=t.state, params=t.params, val_mean_per_class=t.val, val_log_loss=t.val_log_loss,
                            seconds=t.seconds, study=run.name, best_epoch=t.attrs.get("best_epoch"),
                            curve=t.curve, at_edge=edge))
    return out


# ---------------------------------------------------------------------------------------------- results


def finished(run: _Run) -> Searched | None:
    """A finished search's row and trials, or None; an unreadable file is set aside (its finished fits and trials
    resume at once, so nothing is trained twice) instead of stopping the study."""
    rows = finished_rows(run.dir / ROWS_FILE)
    path = run.dir / TRIALS_FILE
    if rows is None or not path.is_file():
        return None
    try:
        return Searched(rows, [TrialRow.from_dict(t) for t in json.loads(path.read_text())])
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s is unreadable (%s): the search is finished again from its kept trials", path, exc)
        return None


def finished_rows(path: Path) -> list[ResultRow] | None:
    """The rows in ``path`` (JSON lines), or None when there are none or they are unreadable (set aside)."""
    if not path.is_file():
        return None
    try:
        return [ResultRow.from_dict(r) for r in read_rows(path)]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("%s is unreadable (%s): it is computed again from the kept fits", path, exc)
        if distributed.is_main():
            path.replace(path.with_suffix(".unreadable"))
        return None


def _curve(fits: list[_Fit]) -> tuple[list[dict], int]:
    """The per-epoch history of a setting's phases, numbered on (phase 2 after phase 1), and its kept epoch."""
    curve, offset = [], 0
    for n, fit in enumerate(fits, 1):
        extra = {"phase": n} if len(fits) > 1 else {}
        curve += [{**h, **extra, "epoch": h["epoch"] + offset} for h in fit.result.history]
        best = fit.result.best_epoch + offset
        offset += fit.result.epochs_run
    return curve, best


def _selection(trials: list[tune.TrialRecord], chosen: tune.TrialRecord, fits: list[_Fit]) -> Selection:
    """Every completed trial with its best-epoch val score; the chosen one's curve (phases numbered on)."""
    complete = [t for t in trials if t.state == "COMPLETE"]
    points = [Point(params=t.params, val_mean_per_class=t.val, val_log_loss=t.val_log_loss,
                    best_epoch=t.attrs.get("best_epoch"), epochs_run=t.attrs.get("epochs_run"),
                    extra={"trial": t.number, "seconds": t.seconds}) for t in complete]
    curve, best_epoch = _curve(fits)
    return Selection(points=tuple(points), chosen=complete.index(chosen), best_epoch=best_epoch, curve=tuple(curve),
                     stopped_early=fits[-1].result.stopped_early)


def _costs(run: _Run, *, trials: list[tune.TrialRecord], final: list[_Fit], predict_s: float) -> Costs:
    # A store hit costs nothing now but the pass was part of this result: charge its rows' recorded compute time
    # (the policies' entries were filled by one shared pass, each charged the whole pass: count it once).
    prefix_s = max(run.rows.cost_s(p) for policy in run.policies for p in parse_policy(policy).phases)
    select_s = sum(t.seconds for t in trials)  # every trial, pruned ones too
    refit_s = sum(f.result.train_s for f in final)
    return Costs(train_s=select_s + refit_s + prefix_s, predict_s=predict_s, select_s=select_s, refit_s=refit_s,
                 prefix_cache_s=prefix_s, train_epochs_s=select_s + refit_s)


def _row(run: _Run, *, trials, chosen, fits, final, logits: np.ndarray, predict_s: float,
         val_logits: np.ndarray) -> ResultRow:
    rows, manifest, hp = run.rows, run.manifest, run.hp
    policy = chosen.params["policy"]
    names = class_names(manifest)
    test = manifest.iloc[rows.positions["test"]].reset_index(drop=True)
    pred = logits.argmax(1)
    net = final[-1].trainer.net
    trainable, total = count_params(net)
    refit_epochs = [f.result.best_epoch + 1 for f in fits]
    cached = all(rows.cached(p) for p in parse_policy(policy).phases)
    metrics = evaluate(test["label"].to_numpy(np.int64), pred, torch.softmax(torch.from_numpy(logits), 1).numpy(),
                       n_classes=len(names), n_boot=hp["n_boot"], seed=run.seed)
    few = {} if run.fewshot is None else {"kind": "fewshot", "k_per_class": run.fewshot[0],
                                          "draw_seed": run.fewshot[1], "fit_on": "train"}
    return ResultRow(**{"kind": "finetune", "fit_on": "train+val", **few},
        backbone=run.backbone.name, method=f"ft:{policy}", feature_set=hp["augment"], tta=hp["tta"],
        split_seed=run.seed, metrics=Metrics.from_dict(metrics), test_sample_id=tuple(test["sample_id"].tolist()),
        test_pred=tuple(pred.tolist()),
        hyperparams={**keyed(hp, ROW_KEYS), **chosen.params, "path": "prefix_cache" if cached else "naive",
                     "trainable_units": net.suffix_names, "best_epoch": fits[-1].result.best_epoch,
                     "refit_epochs": refit_epochs if len(refit_epochs) > 1 else refit_epochs[0]},
        selection=_selection(trials, chosen, fits),
        # The chosen trial's val score (what the report chooses by); the scored model is the chosen setting refit on
        # train+val for its chosen epoch count(s); its training views: the prefix cache reuses V fixed augmented
        # views every epoch, the naive loop draws fresh ones.
        val_mean_per_class=chosen.val, views=hp["views"] if cached else 0, views_fresh=not cached,
        costs=_costs(run, trials=trials, final=final, predict_s=predict_s), trainable_params=trainable,
        total_params=total, epochs_run=sum(f.result.epochs_run for f in fits),
        cache_key=spec_hash(run.spec["inputs"]) if cached else run.key,
        keys={"run_key": run.key, "fit_keys": [f.key for f in final]},
        manifest_hash=manifest_hash(manifest), n_train=len(rows.positions["train"]), n_val=len(rows.positions["val"]),
        n_fit=len(rows.positions["train+val"]), n_test=len(test), class_names=tuple(names), git_sha=git_sha(),
        val_sample_id=tuple(manifest["sample_id"].to_numpy()[rows.positions["val"]].tolist()),
        val_pred=tuple(int(p) for p in val_logits.argmax(1)))


# ---------------------------------------------------------------------------------------------- predictions


def run_predictions(*, backbone, row: ResultRow, manifest_path: Path, data_root: Path, hp: dict, tune_cfg: dict,
                    tune_dir: Path, seed: int, device: str, finetune_dir: Path, store: StoreAccess) -> dict | None:
    """The logits behind a finished fine-tune's row (rank 0; None on other ranks): ``val_logits`` of the chosen
    trial's model trained on train (its kept epoch: what its val score was measured on), ``test_logits`` of the
    refit that scored test, with their ``*_labels`` and ``*_sample_id``. Read from the run's sealed
    ``predictions.pt``; when that is missing or damaged, recomputed from the run's kept models, which resume
    finished, so nothing trains again. Call it on every rank."""
    run = _prepare(backbone=backbone, manifest_path=manifest_path, data_root=data_root, hp=hp, tune_cfg=tune_cfg,
                   tune_dir=tune_dir, seed=seed, device=device, finetune_dir=finetune_dir, store=store,
                   rebuild=False)
    if run.key != row.keys.get("run_key"):
        raise ValueError(f"fine-tune {backbone.name}: this config makes run {run.key}, but the row came from run "
                         f"{row.keys.get('run_key')}; its predictions belong to that run's settings")
    path, found = run.dir / PREDICTIONS, None
    if distributed.is_main() and path.is_file():
        try:
            found = _checked_predictions(read_checkpoint(path), run=run, row=row)
        except Exception as exc:  # damaged, stale or of another layout: never used, recomputed (all ranks)
            log.warning("%s: %s; recomputing it from the run's kept models", path, exc)
    if distributed.broadcast_object(found is not None if distributed.is_main() else None):
        return found  # every rank agrees: nothing to recompute
    log.info("finetune %s: computing the predictions of the finished run %s", backbone.name, run.dir)
    return _recompute_predictions(run, row=row, path=path)


def _recompute_predictions(run: _Run, *, row: ResultRow, path: Path) -> dict | None:
    exp = _experiment(run, resume_only=True)
    chosen = row.selection.best.params
    policy, point = chosen["policy"], {k: v for k, v in chosen.items() if k != "policy"}
    try:
        fits = exp.select(policy, point)
        final = exp.refit(policy, point, fits)
    except NotFinished as exc:
        raise NotFinished(f"fine-tune {run.backbone.name}: {exc}; delete {run.dir} and rerun to train it again "
                          "(its finished fits are reused)") from exc
    out, error = None, None
    if distributed.is_main():
        logits = final[-1].trainer.predict(run.rows.source(final[-1].policy, "test"))
        payload = _save_predictions(run, chosen=fits[-1], test_logits=logits)
        run.rows.release()
        try:
            out = _checked_predictions(payload, run=run, row=row)
        except ValueError as exc:
            error = f"{path}, recomputed from the run's kept models: {exc}"
    error = distributed.broadcast_object(error if distributed.is_main() else None)
    if error:  # raised on every rank alike, so none is left waiting in a collective
        raise ValueError(error)
    return out


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


def _checked_predictions(payload: dict, *, run: _Run, row: ResultRow) -> dict:
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
