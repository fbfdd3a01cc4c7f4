"""What a fine-tune's fits read: per part (train, val, train+val, test, a few-shot draw) the store rows of each
one-phase policy's entry (pooled for ``head``, the cut for ``last:k``: the frozen prefix's output, stored once
per image and view by the shared pass), or the images on the naive path. A part's activations are held while
the fits that read it run, and released as soon as they are done."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataset.manifest import SPLITS
from dataset.views import PARTS, TRAIN_PARTS, part_views, study_requests
from extract.engine import PassSettings, ensure_rows, store_keys
from extract.read import EntryReader
from finetune.train import CachedSource, ImageSource
from study.hashing import spec_hash


@dataclass
class PrefixSplit:
    """One split's activations, as ``load_prefix`` returns them."""
    acts: torch.Tensor  # (N, V, ...) in the store entry's dtype (float16 by default)
    labels: torch.Tensor  # (N,) int64
    sample_id: list[str]


@dataclass
class PrefixCache:
    """Every split's activations of one manifest from one store entry (``load_prefix``)."""
    splits: dict[str, PrefixSplit]
    key: str  # content identity of every row read (store entry + row digests, in order)
    path: Path  # the store entry
    build_s: float  # compute seconds of these rows (their share of the passes that made them)


@dataclass(frozen=True)
class StoreAccess:
    """Where the activation store is and how its missing rows would be computed (the extract stage's settings)."""
    root: Path
    settings: PassSettings
    view_seed: int = 0
    weights_file: str | None = None


class FitInputs:
    """What fits read, per one-phase policy and part: ``train`` (views 0..V), ``val`` (view 0 + test-time
    views), ``train+val`` (views 0..V of both: the refit) and ``test`` (view 0 + test-time views), from the
    store (cached path) or the images (naive path: fresh augmentation every epoch)."""

    def __init__(self, *, backbone, manifest, hp: dict, data_root: Path, stores: dict, view_seed: int):
        self.backbone, self.manifest, self.hp, self.data_root = backbone, manifest, hp, data_root
        self.stores, self.view_seed = stores, view_seed  # one-phase policy -> store entry (absent: naive)
        split = manifest["split"].to_numpy()
        for s in SPLITS:
            if not (split == s).any():
                raise ValueError(f"the manifest has no '{s}' rows; fine-tuning needs train, val and test splits")
        self.positions = {part: np.concatenate([np.flatnonzero(split == s) for s in splits])
                          for part, splits in PARTS.items()}
        self.train_parts = set(TRAIN_PARTS)  # parts read with their augmented views, one drawn per epoch
        # Per instance, never a module-level cache (functools.cache on a method kept every _Rows, and with it
        # every split's activations, alive until the process exited).
        self._readers: dict[str, EntryReader] = {}
        self._memo: dict = {}

    def add_train_part(self, name: str, positions: np.ndarray) -> None:
        """A subset of images to train on, read like ``train``."""
        self.positions[name] = np.asarray(positions, dtype=np.int64)
        self.train_parts.add(name)

    def restrict_train(self, positions: np.ndarray) -> None:
        """Train on ``positions`` alone (a few-shot draw): selection fits on them and is scored on val as ever;
        the refit (``train+val``) is on them alone too, so no image beyond the draw is ever trained on."""
        self.release()
        self.positions["train"] = self.positions["train+val"] = np.asarray(positions, dtype=np.int64)

    def cached(self, policy: str) -> bool:
        return policy in self.stores

    def views(self, part: str) -> list[int]:
        return part_views("train" if part in self.train_parts else part, views=self.hp["views"], tta=self.hp["tta"])

    def keys(self, part: str) -> list[tuple[str, str]]:
        requests = [(int(m), v) for m in self.positions[part] for v in self.views(part)]
        return store_keys(self.manifest, requests, policy=self.hp["augment"], view_seed=self.view_seed)

    def _reader(self, policy: str) -> EntryReader:
        if policy not in self._readers:
            self._readers[policy] = EntryReader(self.stores[policy])
        return self._readers[policy]

    def release(self, *parts: str) -> None:
        """Drop the activations of ``parts`` (every part when none is named): the fits that read them are done."""
        for key in [k for k in self._memo if not parts or k[1] in parts]:
            del self._memo[key]

    def identity(self, policy: str, parts: tuple[str, ...]) -> str:
        """The content identity of the rows ``parts`` read (no data read): the store rows' on the cached path; on
        the naive path the images' content ids and the views each part takes (so a few-shot draw, or any other
        subset of train, is a fit of its own and never resumes another's checkpoint)."""
        if self.cached(policy):
            return self._reader(policy).identity([k for p in parts for k in self.keys(p)])
        ids, labels = self.manifest["sample_id"].to_numpy(dtype=object), self.manifest["label"].to_numpy(np.int64)
        return spec_hash({p: {"images": ids[self.positions[p]].tolist(), "labels": labels[self.positions[p]].tolist(),
                              "views": list(self.views(p))} for p in parts})

    def cost_s(self, policy: str, parts: tuple[str, ...] = ("train+val", "val", "test")) -> float:
        """Compute seconds of every store row ``parts`` read (their share of the passes that made them); by
        default the rows a fine-tune of this policy reads."""
        if not self.cached(policy):
            return 0.0
        return float(self._reader(policy).costs([k for p in parts for k in self.keys(p)]).sum())

    def source(self, policy: str, part: str):
        if (policy, part) in self._memo:
            return self._memo[(policy, part)]
        labels = torch.tensor(self.manifest["label"].to_numpy(np.int64)[self.positions[part]])
        train = part in self.train_parts
        if self.cached(policy):
            acts = self._reader(policy).tensor(self.keys(part), n_views=len(self.views(part)))
            src = CachedSource(acts, labels, eval_views=1 if train else acts.shape[1])
        else:
            rows = self.manifest.iloc[self.positions[part]].reset_index(drop=True)
            src = ImageSource(rows=rows, data_root=self.data_root, data_config=self.backbone.data_config,
                              policy=self.hp["augment"], num_workers=self.hp["num_workers"],
                              tta="none" if train else self.hp["tta"])
        if part != "test":  # test is read once
            self._memo[(policy, part)] = src
        return src


def stores_for(*, backbone, policies: list[str], manifest, hp: dict, access: StoreAccess, data_root: Path,
            rebuild: bool) -> dict:
    """The store entry each one-phase policy reads (pooled for ``head``, the cut for ``last:k``), holding every
    row it needs. After the extract stage this computes nothing (its shared pass stored every cut the config
    names); run alone, it computes the missing rows with the same shared pass."""
    if not policies:
        return {}
    result = ensure_rows(manifest=manifest, backbone=backbone.name, policy=hp["augment"], view_seed=access.view_seed,
                         requests=study_requests(manifest, views=hp["views"], tta=hp["tta"]), store_root=access.root,
                         policies=[p for p in policies if p != "head"], settings=access.settings,
                         weights_file=access.weights_file, data_root=data_root, rebuild=rebuild)
    return {p: result.stores["pooled" if p == "head" else p] for p in policies}


def load_prefix(store, *, manifest, views: int, tta: str, policy: str, view_seed: int) -> PrefixCache:
    """Every split's activations of ``manifest``'s images from ``store``, read as a fine-tune reads them (for
    tests and benchmarks; a fine-tune reads part by part through ``FitInputs.source``)."""
    inputs = FitInputs(backbone=None, manifest=manifest, hp={"views": views, "tta": tta, "augment": policy},
                       data_root=None, stores={"prefix": store}, view_seed=view_seed)
    sample_id = manifest["sample_id"].to_numpy(dtype=object)
    splits = {}
    for split in SPLITS:
        src = inputs.source("prefix", split)
        splits[split] = PrefixSplit(acts=src.acts, labels=src.labels,
                                    sample_id=sample_id[inputs.positions[split]].tolist())
    return PrefixCache(splits=splits, key=inputs.identity("prefix", SPLITS), path=store.dir,
                       build_s=inputs.cost_s("prefix", SPLITS))
