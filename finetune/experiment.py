"""One fine-tuning experiment (backbone x unfreeze policy) from manifest to results rows, cached by spec hash.

``ctx.finetune_dir/<run key>/`` holds ``last.pt`` (resume), ``best.pt`` (the kept model) and ``rows.json``
(the finished run's results rows): a rerun of the same spec re-appends those rows without training.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from classify.metrics import evaluate
from dataset.manifest import class_names, manifest_hash, read_manifest
from dataset.transforms import policy_spec
from extract.engine import PassSettings, ensure_rows, study_requests
from extract.store import FORMAT_VERSION, library_versions
from finetune.data import split_rows
from finetune.model import build_split_net, count_params
from finetune.prefix_cache import load_prefix, prefix_identity
from finetune.train import CachedSource, ImageSource, Trainer
from study import distributed
from study.atomic import write_text_atomic
from study.hashing import spec_hash

log = logging.getLogger(__name__)
# Keys of the [finetune] section that do not change the numbers (so they stay out of the run key).
NOT_NUMERIC = ("policies", "num_workers")


def run_spec(*, backbone_spec: dict, policy: str, hp: dict, seed: int, mhash: str, inputs: str | None) -> dict:
    """What a fine-tune's numbers depend on; ``inputs`` is the content identity of the store rows it reads
    (None on the naive path, which reads the images), so changed activations retrain exactly what read them."""
    return {
        "kind": "finetune",
        "format": FORMAT_VERSION,
        "backbone": backbone_spec,
        "policy": policy,
        "hyperparams": {k: v for k, v in hp.items() if k not in NOT_NUMERIC},
        "augment": policy_spec(hp["augment"]),
        "seed": seed,
        "manifest_hash": mhash,
        "path": "prefix_cache" if inputs is not None else "naive",
        "inputs": inputs,
        "versions": library_versions(),
    }


@dataclass(frozen=True)
class StoreAccess:
    """Where the activation store is and how its missing rows would be computed (the extract stage's settings)."""
    root: Path
    settings: PassSettings
    view_seed: int = 0
    weights_file: str | None = None


def _store_entry(*, backbone, policy: str, manifest, hp: dict, access: StoreAccess, data_root: Path, rebuild: bool):
    """The store entry this policy reads (pooled for ``head``, the cut for ``last:k``), holding every row it needs.

    After the extract stage this computes nothing (its shared pass stored every cut the config names);
    run alone, it computes the missing rows with the same shared pass."""
    layer = "pooled" if policy == "head" else policy
    result = ensure_rows(manifest=manifest, backbone=backbone.name, policy=hp["augment"], view_seed=access.view_seed,
                         requests=study_requests(manifest, views=hp["views"], tta=hp["tta"]), store_root=access.root,
                         policies=[] if layer == "pooled" else [policy], settings=access.settings,
                         weights_file=access.weights_file, data_root=data_root, rebuild=rebuild)
    return result.stores[layer]


def _image_sources(*, backbone, manifest, hp, data_root) -> tuple:
    def images(split):
        return ImageSource(rows=split_rows(manifest, split), data_root=data_root, data_config=backbone.data_config,
                           policy=hp["augment"], num_workers=hp["num_workers"], tta=hp["tta"])
    return images("train"), images("val"), images("test")


def _cached_sources(cache) -> tuple:
    """Train draws among all its cached views; val and test average over theirs (view 0 + test-time views)."""
    def source(split, eval_views):
        return CachedSource(cache.splits[split].acts, cache.splits[split].labels, eval_views=eval_views)
    return (source("train", 1), *(source(s, cache.splits[s].acts.shape[1]) for s in ("val", "test")))


def run_finetune(*, backbone, policy: str, manifest_path: Path, data_root: Path, hp: dict, seed: int, device: str,
                 finetune_dir: Path, store: StoreAccess, rebuild: bool = False, on_epoch_end=None) -> list[dict]:
    """Fine-tune ``backbone`` (extract.backbones.Backbone) with ``policy``; return its results rows (rank 0).

    The frozen prefix's activations come from the activation store (``store``); ``hp["views"]`` is an int."""
    manifest = read_manifest(manifest_path)
    mhash, names = manifest_hash(manifest), class_names(manifest)
    net = build_split_net(backbone, policy=policy, n_classes=len(names), dropout=hp["dropout"],
                          seed=seed)
    entry, inputs = None, None
    if hp["prefix_cache"] and bool(net.prefix_names):
        entry = _store_entry(backbone=backbone, policy=policy, manifest=manifest, hp=hp, access=store,
                             data_root=Path(data_root), rebuild=rebuild)
        inputs, _ = prefix_identity(entry, manifest=manifest, views=hp["views"], tta=hp["tta"], policy=hp["augment"],
                                    view_seed=store.view_seed)
    spec = run_spec(backbone_spec=backbone.spec, policy=policy, hp=hp, seed=seed, mhash=mhash, inputs=inputs)
    key = spec_hash(spec)
    run_dir = Path(finetune_dir) / key
    rows_path = run_dir / "rows.json"
    if rows_path.is_file() and not rebuild:
        log.info("finetune %s %s: cached result in %s", backbone.name, policy, run_dir)
        return json.loads(rows_path.read_text()) if distributed.is_main() else []
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "spec.json", json.dumps(spec, indent=2, sort_keys=True))
    cache = None
    if entry is None:
        train, val, test = _image_sources(backbone=backbone, manifest=manifest, hp=hp, data_root=Path(data_root))
    else:
        cache = load_prefix(entry, manifest=manifest, views=hp["views"], tta=hp["tta"], policy=hp["augment"],
                            view_seed=store.view_seed)
        train, val, test = _cached_sources(cache)
    trainer = Trainer(net=net, hp={**hp, "name": f"{backbone.name} {policy}"}, seed=seed, device=device,
                      ckpt_dir=run_dir, run_key=key)
    fit = trainer.fit(train, val, on_epoch_end=on_epoch_end)
    if not distributed.is_main():
        return []
    t1 = time.perf_counter()
    logits = trainer.predict(test)
    predict_s = time.perf_counter() - t1
    row = _row(backbone=backbone, policy=policy, hp=hp, seed=seed, net=net, fit=fit, logits=logits,
               manifest=manifest, names=names, mhash=mhash, key=key, cache=cache, predict_s=predict_s)
    write_text_atomic(rows_path, json.dumps([row]))
    return [row]


def _row(*, backbone, policy, hp, seed, net, fit, logits, manifest, names, mhash, key, cache, predict_s) -> dict:
    test = split_rows(manifest, "test")
    y_test = test["label"].to_numpy(np.int64)
    pred = logits.argmax(1)
    scores = torch.softmax(torch.from_numpy(logits), 1).numpy()
    trainable, total = count_params(net)
    # A cache hit costs nothing now but the build was part of this result: charge its recorded build time.
    prefix_s = cache.build_s if cache is not None else 0.0
    return {
        "kind": "finetune",
        "backbone": backbone.name,
        "method": f"ft:{policy}",
        "feature_set": hp["augment"],
        "tta": hp["tta"],
        "seed": seed,
        "k_per_class": None,
        "metrics": evaluate(y_test, pred, scores, n_classes=len(names), n_boot=hp["n_boot"], seed=seed),
        "test_sample_id": test["sample_id"].tolist(),
        "test_pred": pred.tolist(),
        "hyperparams": {**{k: v for k, v in hp.items() if k not in NOT_NUMERIC}, "policy": policy,
                        "path": "prefix_cache" if cache is not None else "naive",
                        "trainable_units": net.suffix_names, "best_epoch": fit.best_epoch},
        "selection": {"metric": "val_mean_per_class", "best_epoch": fit.best_epoch, "best_score": fit.best_score,
                      "curve": fit.history, "stopped_early": fit.stopped_early},
        # The kept epoch's val score (what the report chooses variants by); what the scored model was
        # fit on (the best-epoch checkpoint of a model trained on train); and its training views: the
        # prefix cache reuses V fixed augmented views every epoch, the naive loop draws fresh ones.
        "val_mean_per_class": fit.best_score,
        "fit_on": "train",
        "views": hp["views"] if cache is not None else 0,
        "views_fresh": cache is None,
        "train_s": fit.train_s + prefix_s,
        "train_epochs_s": fit.train_s,
        "prefix_cache_s": prefix_s,
        "predict_s": predict_s,
        "trainable_params": trainable,
        "total_params": total,
        "epochs_run": fit.epochs_run,
        "cache_key": cache.key if cache is not None else key,
        "run_key": key,
        "manifest_hash": mhash,
        "n_train": int((manifest["split"] == "train").sum()),
        "n_val": int((manifest["split"] == "val").sum()),
        "n_test": len(test),
        "class_names": names,
    }
