"""A fine-tune's fits: one training run each (one one-phase policy, one setting, one fit set, one starting head),
resumable and shared, on the inputs its policies read.

A setting of a policy trains on train and is scored on val after every epoch; its val score is its best epoch's
(early stopping after ``patience`` epochs without a better one). The chosen setting is refit on train+val for its
best epoch count (nothing is evaluated, no early stopping; the cached path reads val images' views 0..V like
train's). ``probe+last:k`` (freeze, then unfreeze) runs two phases: phase 1 trains the new head alone on the frozen
network (the ``head`` policy: pooled features) until val stops improving; phase 2 starts from phase 1's best head
and trains the last k units (``last:k``: the cut activations); the setting's val score is phase 2's.

Layout: every fit lives in ``finetune_dir/fits/<fit key>/`` (``last.pt`` to resume, ``best.pt`` the kept epoch),
its key built from the fields that change its numbers (finetune/config.py), so a fit two searches share trains
once and a fit cut off mid-way resumes where it stopped. How settings are searched and chosen is
finetune/search.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset.manifest import class_names, manifest_hash
from dataset.transforms import policy_spec
from extract.blocks import parse_policy
from extract.store import FORMAT_VERSION, library_versions
from finetune.config import FIXED_KEYS, ROW_KEYS, SEARCH_AXES
from finetune.inputs import FitInputs, StoreAccess, stores_for
from finetune.model import build_split_net, frozen_units
from finetune.train import FitResult, Trainer
from study import distributed
from study.atomic import file_lock, write_text_atomic
from study.hashing import spec_hash
from study.precision import resolve_precision

log = logging.getLogger(__name__)
# The layout and key format of finetune/ (2: a grid chosen on val, refit on train+val, fits/<key>/).
FIT_FORMAT = 2
# Keys of the [finetune] section that do not change a fit's numbers (so they stay out of its key).


def trunk_trains(policy: str) -> bool:
    return parse_policy(policy).last != 0


def phase_params(point: dict, train_policy: str) -> dict:
    """A setting's parameters that change ``train_policy``'s training (phase 1 of a probe: no trunk mult)."""
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
    whatever else ``hp`` carries (run settings, a name, keys a newer config added). Every field of ``keys`` must
    be there; of the searched axes, those it holds."""
    return {**{k: hp[k] for k in keys}, **{k: hp[k] for k in SEARCH_AXES if k in hp}}


class _Experiment:
    def __init__(self, *, backbone, manifest, hp, seed, device, finetune_dir: Path, rows: FitInputs, base: dict,
                 on_epoch_end, resume_only: bool = False):
        self.backbone, self.manifest, self.hp, self.seed, self.device = backbone, manifest, hp, seed, device
        self.finetune_dir, self.rows, self.base, self.on_epoch_end = Path(finetune_dir), rows, base, on_epoch_end
        self.resume_only = resume_only  # finished fits only: never train (finetune.train.NotFinished)
        self.n_classes = len(class_names(manifest))
        self._fits: dict[str, _Fit] = {}

    def fit_spec(self, *, policy: str, params: dict, fit_on: str, epochs: int | None, init: str | None) -> dict:
        hp = keyed({**self.hp, **params}, FIXED_KEYS)
        if policy == "head":
            hp.pop("backbone_lr_mult", None)  # no trunk trains
        parts = ("train", "val") if fit_on == "train" else (fit_on,)
        return {**self.base, "unit": "fit", "policy": policy, "hyperparams": hp, "fit_on": fit_on, "epochs": epochs,
                "init": init, "path": "prefix_cache" if self.rows.cached(policy) else "naive",
                "inputs": self.rows.identity(policy, parts)}

    def fit(self, *, policy: str, params: dict, fit_on: str = "train", epochs: int | None = None,
            init: _Fit | None = None, on_epoch_end=None) -> _Fit:
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
                                     on_epoch_end=on_epoch_end or self.on_epoch_end, resume_only=self.resume_only)
            else:
                result = trainer.fit_fixed(self.rows.source(policy, fit_on), epochs=epochs,
                                           on_epoch_end=on_epoch_end or self.on_epoch_end,
                                           resume_only=self.resume_only)
        self._fits[key] = fit = _Fit(key=key, policy=policy, params=params, result=result, trainer=trainer)
        return fit

    def select(self, policy: str, point: dict, *, on_epoch_end=None) -> list[_Fit]:
        """A setting trained on train, scored on val: its fits in phase order (the last one is scored, and only its
        epochs are reported to ``on_epoch_end``)."""
        phases, fits = parse_policy(policy).phases, []
        for n, phase in enumerate(phases, 1):
            fits.append(self.fit(policy=phase, params=phase_params(point, phase), init=fits[-1] if fits else None,
                                 on_epoch_end=on_epoch_end if n == len(phases) else None))
        return fits

    def forget(self) -> None:
        """Drop the fits (and their networks) held so far: a finished one resumes from its checkpoints."""
        self._fits.clear()

    def refit(self, policy: str, point: dict, chosen: list[_Fit]) -> list[_Fit]:
        """The chosen setting's phases again on train+val, each for the epoch count val chose for it."""
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
    with_prefix = [p for p in phases if hp["prefix_cache"] and frozen_units(backbone, p)]
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
