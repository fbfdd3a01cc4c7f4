"""The frozen-prefix activation cache: the frozen trunk's output, computed once, stored as float16 HDF5.

For ``last:k`` the frozen prefix is deterministic (eval mode, no grad), so its output for
(image, view) never changes: computing it once for every training image x view 0..K and for the
clean val/test images (plus their mirror, view -1, with ``tta = "hflip"``) lets every epoch run only
the trainable suffix.

File ``<cache_dir>/<key>.h5``; key = sha256 of the canonical JSON of the spec (backbone spec with
weights hash and pre-processing, prefix units, augmentation policy, views, seed, manifest hash,
storage dtype, precision, library versions). Per split: ``<split>/acts`` (N, V, ...) float16,
``<split>/sample_id``, ``<split>/labels``; attrs ``spec_json``, ``key``, ``complete``, ``n_done``.
The file is written as ``<key>.h5.partial`` (resumable from its completed rows) and renamed with
``os.replace`` once complete; reading re-derives the key and checks sample order, shape, finiteness.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dataset.transforms import policy_spec, tta_views
from extract.cache import library_versions, spec_differences
from finetune.data import ManifestViews, image_loader, split_rows
from study.hashing import canonical_json, spec_hash

SPLITS = ("train", "val", "test")
STORAGE_DTYPE = "float16"
log = logging.getLogger(__name__)


class PrefixCacheError(ValueError):
    """A prefix cache that does not match what it should hold."""


@dataclass
class PrefixSplit:
    acts: torch.Tensor  # (N, V, ...) float16
    labels: torch.Tensor  # (N,) int64
    sample_id: list[str]


@dataclass
class PrefixCache:
    splits: dict[str, PrefixSplit]
    spec: dict
    key: str
    path: Path
    build_s: float


def prefix_spec(*, net, backbone_spec: dict, augment: str, views: int, seed: int, manifest_hash: str,
                precision: str, tta: str = "none") -> dict:
    return {
        "kind": "prefix_activations",
        "backbone": backbone_spec,
        "prefix_units": list(net.prefix_names),
        "pooled": len(net.suffix_names) == 0,
        "augment": policy_spec(augment),
        "views": views,
        "tta": tta,
        "seed": seed,
        "manifest_hash": manifest_hash,
        "storage_dtype": STORAGE_DTYPE,
        "precision": precision,
        "versions": library_versions(),
    }


def split_views(split: str, spec: dict) -> list[int]:
    """The view ids cached per image: train 0..K; val and test view 0 and its test-time views."""
    if split == "train":
        return list(range(spec["views"] + 1))
    return [0, *tta_views(spec.get("tta", "none"))]


def build_prefix_cache(*, net, spec: dict, manifest: pd.DataFrame, data_root: Path, cache_dir: Path,
                       data_config: dict, device: str = "cpu", batch_size: int = 64, num_workers: int = 2,
                       autocast_dtype: torch.dtype | None = None, rebuild: bool = False) -> Path:
    """Compute (or find) the prefix cache for ``spec``; return its path. A hit returns at once."""
    key = spec_hash(spec)
    path = Path(cache_dir) / f"{key}.h5"
    if path.is_file() and not rebuild:
        return path
    partial = path.with_name(path.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    if rebuild:
        partial.unlink(missing_ok=True)
    net = net.to(device)
    t0 = time.perf_counter()
    with h5py.File(partial, "a") as f:
        _init_file(f, spec=spec, key=key, manifest=manifest, net=net, data_config=data_config, device=device)
        for split in SPLITS:
            _fill_split(f, split=split, net=net, spec=spec, manifest=manifest, data_root=data_root,
                        data_config=data_config, device=device, batch_size=batch_size, num_workers=num_workers,
                        autocast_dtype=autocast_dtype)
        # Seconds spent on this cache, summed over interrupted attempts: part of a fine-tuning run's cost.
        f.attrs["build_s"] = float(f.attrs.get("build_s", 0.0)) + time.perf_counter() - t0
        f.attrs["complete"] = True
    os.replace(partial, path)
    return path


def _init_file(f: h5py.File, *, spec, key, manifest, net, data_config, device) -> None:
    if f.attrs.get("key") == key:
        return  # resuming a partial file of the same spec
    if "key" in f.attrs:
        raise PrefixCacheError(f"{f.filename} belongs to another spec ({f.attrs['key']}); delete it")
    size = data_config["crop_size"]
    with torch.no_grad():
        shape = tuple(net.forward_prefix(torch.zeros(1, 3, size, size, device=device)).shape[1:])
    for split in SPLITS:
        rows = split_rows(manifest, split)
        n_views = len(split_views(split, spec))
        f.create_dataset(f"{split}/acts", shape=(len(rows), n_views, *shape), dtype=STORAGE_DTYPE,
                         chunks=(1, n_views, *shape))
        f.create_dataset(f"{split}/sample_id", data=np.array(rows["sample_id"].tolist(), dtype=object),
                         dtype=h5py.string_dtype())
        f.create_dataset(f"{split}/labels", data=rows["label"].to_numpy(np.int64))
        f[split].attrs["n_done"] = 0
    f.attrs.update({"spec_json": canonical_json(spec), "key": key, "complete": False})


@torch.no_grad()
def _fill_split(f: h5py.File, *, split, net, spec, manifest, data_root, data_config, device, batch_size,
                num_workers, autocast_dtype) -> None:
    rows = split_rows(manifest, split)
    done = int(f[split].attrs["n_done"])
    if done >= len(rows):
        return
    views = [split_views(split, spec)] * len(rows)
    dataset = ManifestViews(rows=rows, data_root=data_root, data_config=data_config, policy=spec["augment"]["name"],
                            seed=spec["seed"], views=views)
    per_batch = max(1, batch_size // len(views[0]))
    loader = image_loader(dataset, order=np.arange(done, len(rows)), batch_size=per_batch, num_workers=num_workers)
    acts = f[f"{split}/acts"]
    net.eval()
    with tqdm(total=len(rows) * len(views[0]), initial=done * len(views[0]), unit="img",
              desc=f"prefix cache {split}", leave=False) as bar:
        for images, index in loader:
            b, v = images.shape[:2]
            x = images.flatten(0, 1).to(device, non_blocking=True)
            with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                out = net.forward_prefix(x)
            out = out.float().reshape(b, v, *out.shape[1:]).cpu().numpy().astype(np.float16)
            lo = int(index[0])
            acts[lo : lo + b] = out
            f[split].attrs["n_done"] = lo + b  # rows before this are complete: an interrupt resumes here
            f.flush()
            bar.update(b * v)


def load_prefix_cache(path: str | Path, *, expected_spec: dict, manifest: pd.DataFrame) -> PrefixCache:
    """Read a cache into memory after checking its key, completeness, sample order and finiteness."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        stored = json.loads(f.attrs["spec_json"])
        _check_spec(path, stored, expected_spec, f.attrs.get("key"))
        if not f.attrs.get("complete"):
            raise PrefixCacheError(f"{path} is incomplete; rerun to finish it (or --rebuild-cache)")
        splits = {split: _read_split(f, split, path, manifest) for split in SPLITS}
        build_s = float(f.attrs.get("build_s", float("nan")))
    return PrefixCache(splits=splits, spec=stored, key=spec_hash(stored), path=path, build_s=build_s)


def _check_spec(path: Path, stored: dict, expected: dict, key) -> None:
    if key != spec_hash(stored):
        raise PrefixCacheError(f"{path}: stored key {key} is not the hash of its spec; the file is damaged, delete it")
    if stored != json.loads(canonical_json(expected)):
        diff = spec_differences(json.loads(canonical_json(expected)), stored)
        raise PrefixCacheError(f"{path} was built for another spec; differing fields: {'; '.join(diff)}. "
                               "Rerun with --rebuild-cache to rebuild it")


def _read_split(f: h5py.File, split: str, path: Path, manifest: pd.DataFrame) -> PrefixSplit:
    rows = split_rows(manifest, split)
    ids = [s.decode() if isinstance(s, bytes) else s for s in f[f"{split}/sample_id"][:]]
    if ids != rows["sample_id"].tolist():
        raise PrefixCacheError(f"{path}: the {split} sample_id order differs from the manifest's")
    acts = torch.from_numpy(f[f"{split}/acts"][:])
    if acts.shape[0] != len(rows) or not torch.isfinite(acts).all():
        raise PrefixCacheError(f"{path}: {split} activations have shape {tuple(acts.shape)} for {len(rows)} rows "
                               "or non-finite values; rebuild with --rebuild-cache")
    return PrefixSplit(acts=acts, labels=torch.from_numpy(f[f"{split}/labels"][:]), sample_id=ids)


def prefix_from_features(fs, *, spec: dict, manifest: pd.DataFrame, precision: str) -> PrefixCache | None:
    """The ``head`` policy's prefix output *is* the pooled feature the extract stage cached: reuse it.

    Reused only when the feature cache was made from the same images the prefix cache would hold —
    same backbone spec, augmentation policy, seed, manifest, resolved ``precision``, and at least as
    many views — so the activations are the ones a prefix pass would compute. Otherwise None.
    """
    f, want = fs.spec, json.loads(canonical_json(spec))
    same = (spec["pooled"] and f.get("backbone") == want["backbone"] and f.get("policy") == want["augment"]
            and f.get("seed") == want["seed"] and f.get("manifest_hash") == want["manifest_hash"]
            and f.get("precision") == precision and f.get("views", -1) >= want["views"]
            and set(tta_views(want.get("tta", "none"))) <= set(tta_views(f.get("tta", "none"))))
    if not same:
        return None
    row_of = {(s, int(v)): i for i, (s, v) in enumerate(zip(fs.sample_id, fs.view))}
    splits = {}
    for split in SPLITS:
        ids = split_rows(manifest, split)["sample_id"].tolist()
        views = split_views(split, want)
        idx = np.array([[row_of[(s, v)] for v in views] for s in ids], dtype=np.int64).reshape(len(ids), len(views))
        acts = torch.from_numpy(fs.features[idx].astype(np.float16))  # the prefix cache's storage dtype
        labels = torch.from_numpy(fs.labels[idx[:, 0]] if len(ids) else np.zeros(0, np.int64))
        splits[split] = PrefixSplit(acts=acts, labels=labels, sample_id=ids)
    # The features' extraction is this run's prefix cost, as a built prefix cache's would be.
    return PrefixCache(splits=splits, spec=want, key=fs.key, path=fs.path, build_s=fs.extract_s or 0.0)
