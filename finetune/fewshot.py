"""The fine-tune arm's few-shot curve: the val-chosen fine-tune retrained on k images per class.

The recipe (backbone, policy, grid point) is the one the full-data protocol chose on val for this split
seed; nothing is re-selected per k. The k images per class are drawn exactly as the head arm draws them
(``study.protocol.draw_indices`` over the train+val pool in manifest order, same draw seeds), so at
each (k, draw) both arms see the same labelled images. A fit on fewer images keeps the chosen refit's
training length in *optimizer steps*: its epochs (and the schedule's total and warm-up epochs) are
scaled by (train+val images) / (k x classes), rounded up, so a 1-shot fit is not starved of updates
relative to the 30-shot one, and costs about as much as the refit did. Test is read once per fit. Where k
takes the whole pool (k = 30 of Caltech's 30 train+val images per class), the draw is the refit's own
training set, and the point is the chosen row itself.

Rows are ``kind = "fewshot"`` with ``method = "ft:<policy>"``; a finished curve is cached in
``finetune_dir/fewshot-<key>/rows.json`` and re-appended without training on a rerun.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from dataset.manifest import class_names, manifest_hash, read_manifest
from extract.blocks import parse_policy
from finetune.config import ROW_KEYS
from finetune.experiment import _Experiment, experiment_inputs, keyed, phase_params
from finetune.model import count_params
from finetune.search import ROWS_FILE, finished_rows
from study import distributed
from study.atomic import write_text_atomic
from study.hashing import spec_hash
from study.metrics import evaluate
from study.protocol import draw_indices, smallest_class
from study.provenance import git_sha
from study.results import Costs, Metrics, ResultRow, append_skip, rows_text

log = logging.getLogger(__name__)
# Bump when the draws, the step scaling or the reuse of the refit row change what a curve holds.
FEWSHOT_FORMAT = 2


def chosen_recipe(row: ResultRow) -> tuple[str, dict, list[int]]:
    """(policy, setting, refit epochs per phase) of a fine-tune row: what val chose and the refit ran."""
    epochs = row.hyperparams["refit_epochs"]
    point = {k: v for k, v in row.selection.best.params.items() if k != "policy"}
    return row.hyperparams["policy"], point, list(epochs) if isinstance(epochs, list) else [int(epochs)]


def scaled_schedule(hp: dict, *, refit_epochs: int, n_full: int, n_k: int) -> tuple[dict, int]:
    """Schedule overrides and epoch count that give a fit on ``n_k`` images the optimizer steps of a refit on
    ``n_full`` (steps per epoch: ceil(images / batch size))."""
    factor = math.ceil(n_full / hp["batch_size"]) / math.ceil(max(n_k, 1) / hp["batch_size"])
    overrides = {"epochs": math.ceil(hp["epochs"] * factor), "warmup_epochs": math.ceil(hp["warmup_epochs"] * factor)}
    return overrides, min(math.ceil(refit_epochs * factor), overrides["epochs"])


def run_fewshot(*, backbone, row: ResultRow, manifest_path: Path, data_root: Path, hp: dict, seed: int, device: str,
                finetune_dir: Path, store, ks: list[int], draws: int, pool: str,
                run_dir: Path | None = None) -> list[ResultRow]:
    """The few-shot rows of the fine-tune ``row`` chose (rank 0; others return [])."""
    manifest = read_manifest(manifest_path)
    names = class_names(manifest)
    policy, point, refit_epochs = chosen_recipe(row)
    phases = parse_policy(policy).phases
    rows, base = experiment_inputs(backbone=backbone, phases=phases, manifest=manifest, hp=hp, seed=seed,
                                   device=device, store=store, data_root=Path(data_root))
    inputs = {p: rows.identity(p, ("train+val", "test")) for p in phases}
    spec = {**base, "unit": "fewshot", "fewshot_format": FEWSHOT_FORMAT, "policy": policy, "point": point,
            "hyperparams": {k: v for k, v in keyed(hp, ROW_KEYS).items() if k not in point}, "inputs": inputs,
            "refit_epochs": refit_epochs, "k": list(ks), "draws": draws, "pool": pool}
    out_dir = Path(finetune_dir) / f"fewshot-{spec_hash(spec)}"
    cached = finished_rows(out_dir / ROWS_FILE)
    if cached is not None:
        log.info("few-shot %s %s: cached result in %s", backbone.name, policy, out_dir)
        return cached if distributed.is_main() else []
    exp = _Experiment(backbone=backbone, manifest=manifest, hp=hp, seed=seed, device=device,
                      finetune_dir=Path(finetune_dir), rows=rows, base=base, on_epoch_end=None)
    candidates = rows.positions[pool]
    labels = manifest["label"].to_numpy(np.int64)[candidates]
    largest = smallest_class(labels)
    out = []
    for k in ks:
        if k > largest:
            log.warning("few-shot %s k=%d: the smallest class has %d images in the %s pool", policy, k, largest, pool)
            if run_dir is not None and distributed.is_main():
                append_skip(run_dir, stage="finetune", what=f"{backbone.name} ft:{policy} few-shot k={k}",
                            reason=f"the smallest class has {largest} images in the '{pool}' pool",
                            fix="lower classify.fewshot.k")
            continue
        if pool == "train+val" and k * len(np.unique(labels)) == len(candidates):
            # Every draw takes the whole pool: the fit is the chosen refit on train+val itself, so its row is
            # the curve's point (training it again would differ only in batch order).
            out.append(_refit_point(row, k=k, pool=pool))
            continue
        for draw in range(seed, seed + draws):
            drawn = candidates[draw_indices(labels, k=k, seed=draw)]
            # The part's name is the fit's key (fit_on): it names the drawn images, also on the naive path.
            ids = spec_hash(manifest["sample_id"].to_numpy()[drawn].tolist())[:16]
            part = f"fewshot:{pool}:{k}:{draw}:{ids}"
            rows.add_train_part(part, drawn)
            out.append(_fit_one(exp, rows, policy=policy, point=point, refit_epochs=refit_epochs, part=part, k=k,
                                draw=draw, seed=seed, hp=hp, names=names, backbone=backbone, pool=pool))
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "spec.json", json.dumps(spec, indent=2, sort_keys=True))
        write_text_atomic(out_dir / ROWS_FILE, rows_text(out))
    return out if distributed.is_main() else []


def _refit_point(row: ResultRow, *, k: int, pool: str) -> ResultRow:
    """The chosen fine-tune's own row as the few-shot point at k = the pool size (its refit used every image)."""
    return row.replace(kind="fewshot", draw_seed=row.split_seed, k_per_class=k,
                       hyperparams={**row.hyperparams, "same_as": "the chosen refit"}, selection=None,
                       val_mean_per_class=None, fit_on=pool, n_val=0, n_train=row.n_fit, n_fit_rows=row.n_fit,
                       costs=Costs(train_s=row.costs.train_s, predict_s=row.costs.predict_s), epochs_run=None,
                       keys={})


def _fit_one(exp, rows, *, policy, point, refit_epochs, part, k, draw, seed, hp, names, backbone,
             pool) -> ResultRow:
    # The refit trained on train+val, whatever the pool the draws come from.
    n_full, n_k = len(rows.positions["train+val"]), len(rows.positions[part])
    fits = []
    for phase, epochs in zip(parse_policy(policy).phases, refit_epochs):
        overrides, n_epochs = scaled_schedule({**hp, **point}, refit_epochs=epochs, n_full=n_full, n_k=n_k)
        fits.append(exp.fit(policy=phase, params={**phase_params(point, phase), **overrides}, fit_on=part,
                            epochs=n_epochs, init=fits[-1] if fits else None))
    manifest = rows.manifest
    test = manifest.iloc[rows.positions["test"]].reset_index(drop=True)
    t1 = time.perf_counter()
    logits = fits[-1].trainer.predict(rows.source(fits[-1].policy, "test"))
    predict_s = time.perf_counter() - t1
    rows.release(part)  # a draw's activations are read by its fit only
    pred = logits.argmax(1)
    trainable, total = count_params(fits[-1].trainer.net)
    # No bootstrap: the curve's spread is over draws and split seeds (as the head arm's few-shot table shows).
    metrics = evaluate(test["label"].to_numpy(np.int64), pred, torch.softmax(torch.from_numpy(logits), 1).numpy(),
                       n_classes=len(names), n_boot=0, seed=draw)
    log.info("few-shot %s %s k=%d draw %d: test mean per-class %.4f", backbone.name, policy, k, draw,
             metrics["mean_per_class"])
    cached = rows.cached(fits[-1].policy)
    return ResultRow(
        kind="fewshot", backbone=backbone.name, method=f"ft:{policy}", feature_set=hp["augment"], tta=hp["tta"],
        split_seed=seed, draw_seed=draw, k_per_class=k, metrics=Metrics.from_dict(metrics),
        test_sample_id=tuple(test["sample_id"].tolist()), test_pred=tuple(pred.tolist()),
        hyperparams={**point, "policy": policy, "trained_epochs": [f.result.epochs_run for f in fits]}, fit_on=pool,
        views=hp["views"] if cached else 0, views_fresh=not cached,
        costs=Costs(train_s=sum(f.result.train_s for f in fits), predict_s=predict_s),
        trainable_params=trainable, total_params=total, cache_key=spec_hash([f.key for f in fits]),
        manifest_hash=manifest_hash(manifest), n_train=n_k, n_val=0, n_fit=n_k, n_fit_rows=n_k, n_test=len(test),
        class_names=tuple(names), git_sha=git_sha())
