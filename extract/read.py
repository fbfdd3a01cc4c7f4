"""The one reader of the activation store: rows by (image sha256, view name) key, as a NumPy array or a torch
tensor, with their content identity and their compute costs.

Every consumer reads through an ``EntryReader``: the heads' feature sets (``extract.cache``), the ``stages``
set (``classify.stacked``) and the fine-tunes' inputs (``finetune.inputs``). It indexes its entry once;
identity and cost need no row bytes, so a consumer can key its work by them before it reads anything.

``load_features`` is the same reader for your own code: a backbone's stored features of a run's images, with their
labels, sample ids and splits, as NumPy arrays or a pandas frame (the README shows a scikit-learn model on them).
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from extract.store import Index, Store, StoreMissingRows, StoreReplaced
from study.errors import StudyError


class EntryReader:
    """Reads rows of one store entry (see the module docstring); every row read is checksummed."""

    def __init__(self, store: Store):
        self.store = store
        self._index: Index | None = None

    @property
    def index(self) -> Index:
        if self._index is None:
            self._index = self.store.index()
        return self._index

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype(self.store.spec["storage_dtype"])

    def identity(self, keys) -> str:
        """The content identity of ``keys``' rows in this order (the store entry and the rows' digests)."""
        return self._indexed(keys, lambda index: self.store.identity(keys, index))

    def costs(self, keys) -> np.ndarray:
        """Compute seconds of each of ``keys``: its share of the pass that made it (a repeated key is free)."""
        def costs(index: Index) -> np.ndarray:
            self.store.require(keys, index)
            return index.row_costs(keys)
        return self._indexed(keys, costs)

    def array(self, keys, *, dtype=np.float32) -> np.ndarray:
        """The rows of ``keys``, (N, ...) as ``dtype`` (None: the entry's storage dtype)."""
        dtype = self.storage_dtype if dtype is None else dtype
        return self._indexed(keys, lambda index: self.store.read(keys, index, dtype=dtype))

    def _indexed(self, keys, use):
        """``use(index)``, once more on a fresh index when another process changed the entry meanwhile: rows
        missing while it writes them (waited for), or segments it removed (--rebuild-cache, --prune) -- those
        rows must then hold the same bytes (digests) as before, or this reader would mix two contents."""
        try:
            return use(self.index)
        except StoreMissingRows:
            if not self.store.wait_for_writer():
                raise
            self._index = None
            return use(self.index)
        except StoreReplaced as exc:
            before = self.index
            self.store.wait_for_writer()  # a rebuild computes the rows again under the entry's lock
            self._index = None
            now = self.index.rows
            changed = [k for k in dict.fromkeys(keys)
                       if k in before.rows and k in now and now[k][2] != before.rows[k][2]]
            if changed:
                raise StudyError(f"{exc}, and it now holds other bytes for rows this process already used (first: "
                                 f"image {changed[0][0][:12]}..., view {changed[0][1]}); rerun this stage") from exc
            return use(self.index)

    def chunks(self, keys, *, max_bytes: int) -> Iterator[np.ndarray]:
        """The rows of ``keys`` at the storage dtype, at most ``max_bytes`` (and one row) at a time, in order."""
        if not keys:
            return
        step = max(1, max_bytes // max(1, self.array(keys[:1], dtype=None)[0].nbytes))
        for start in range(0, len(keys), step):
            yield self.array(keys[start:start + step], dtype=None)

    def tensor(self, keys, *, n_views: int) -> torch.Tensor:
        """(N, ``n_views``, ...) at the entry's own dtype (float16 halves a fine-tune's memory; a float32 entry
        keeps what it stored) from image-major ``keys`` (each image's ``n_views`` views together)."""
        acts = self.array(keys, dtype=None)
        return torch.from_numpy(acts.reshape(len(keys) // n_views, n_views, *acts.shape[1:]))


# ---------------------------------------------------------------------------------------------- for your own code

VIEWS = ("clean", "mirror", "tta")  # besides an augmented view's number k >= 1 (stored for train and val images)


@dataclass(frozen=True)
class Features:
    """One backbone's stored features of a run's images, row i being image i of the split seed's manifest."""
    X: np.ndarray  # (N, D) float32 (a fine-tune cut: (N, C, H, W))
    y: np.ndarray  # (N,) labels 0..C-1
    sample_id: np.ndarray  # (N,) "<source>/<class folder>/<file>"
    split: np.ndarray  # (N,) train | val | test
    class_names: list[str]  # by label
    path: np.ndarray  # (N,) image paths, relative to the data root

    def frame(self):
        """A pandas frame: sample_id, path, split, label, class_name, then the feature columns f0..f{D-1}."""
        import pandas as pd

        if self.X.ndim != 2:
            raise ValueError(f"a frame holds one feature vector per image; these rows are {self.X.shape[1:]}")
        info = pd.DataFrame({"sample_id": self.sample_id, "path": self.path, "split": self.split, "label": self.y,
                             "class_name": np.asarray(self.class_names)[self.y]})
        return pd.concat([info, pd.DataFrame(self.X, columns=[f"f{i}" for i in range(self.X.shape[1])])], axis=1)


def load_features(source, backbone: str | None = None, *, view: str | int = "clean", layer: str = "pooled",
                  split_seed: int | None = None, as_frame: bool = False):
    """The stored features of ``backbone`` (default: the run's first) for every image of a run, read from its
    activation store: ``source`` is a run folder (``<out>/runs/<run>``) or an ``--out`` folder (its newest run that
    extracted features). ``view``: "clean" (the eval view), "mirror", "tta" (their mean: what the heads read with
    extract.tta = "hflip"), or k >= 1 (augmented view k: train and val images only). ``layer``: "pooled", or a
    fine-tune cut the run stored (e.g. "last:1"). ``split_seed``: whose splits (default: the run's first seed).
    Returns ``Features`` (NumPy arrays), or with ``as_frame`` its pandas frame."""
    from dataset.manifest import class_names, read_manifest

    run = _run_folder(Path(source))
    config = tomllib.loads((run / "config.resolved.toml").read_text())
    entry = _entry(json.loads((run / "features.json").read_text()), backbone, run=run)
    if layer not in entry["layers"]:
        raise ValueError(f"layer {layer!r} of {entry['backbone']}; allowed: {sorted(entry['layers'])} (what run "
                         f"{run.name} stored)")
    seeds = list(config.get("seeds") or [config["seed"]])
    seed = seeds[0] if split_seed is None else split_seed
    if seed not in seeds:
        raise ValueError(f"split_seed {seed}; allowed: the run's split seeds {seeds}")
    out = run.parent.parent
    manifest = read_manifest(out / "dataset" / (f"seed-{seed}" if len(seeds) > 1 else "") / "manifest.csv")
    X, keep = _rows(Store.open(out / entry["layers"][layer]), manifest, view=view, extract=config["extract"])
    m = manifest[keep].reset_index(drop=True)
    found = Features(X=X, y=m["label"].to_numpy(np.int64), sample_id=m["sample_id"].to_numpy(str),
                     split=m["split"].to_numpy(str), class_names=class_names(manifest), path=m["path"].to_numpy(str))
    return found.frame() if as_frame else found


def _run_folder(source: Path) -> Path:
    if (source / "features.json").is_file() and (source / "config.resolved.toml").is_file():
        return source
    runs = sorted((p for p in (source / "runs").glob("*") if (p / "features.json").is_file()), reverse=True) \
        if (source / "runs").is_dir() else []
    if not runs:
        raise FileNotFoundError(f"{source} is neither a run folder with features.json nor an --out folder with such "
                                "a run: run the study's extract stage first")
    return runs[0]


def _entry(entries: list[dict], backbone: str | None, *, run: Path) -> dict:
    names = [e["backbone"] for e in entries]
    if not names:
        raise ValueError(f"run {run.name} extracted no backbone's features")
    if backbone is None:
        return entries[0]
    if backbone not in names:
        raise ValueError(f"backbone {backbone!r}; allowed: {names} (the backbones run {run.name} extracted)")
    return entries[names.index(backbone)]


def _rows(store: Store, manifest, *, view, extract: dict) -> tuple[np.ndarray, np.ndarray]:
    """(the rows of ``view`` for the manifest images that have it, which images those are)."""
    from dataset.transforms import MIRROR_VIEW
    from extract.engine import store_keys

    if view not in VIEWS and not (isinstance(view, int) and not isinstance(view, bool) and view >= 1):
        raise ValueError(f"view {view!r}; allowed: {', '.join(VIEWS)} or an augmented view's number k >= 1")
    keep = np.ones(len(manifest), bool) if not isinstance(view, int) else (manifest["split"] != "test").to_numpy()
    ids = {"clean": [0], "mirror": [MIRROR_VIEW], "tta": [0, MIRROR_VIEW]}.get(view, [view])
    reader = EntryReader(store)
    parts = [reader.array(store_keys(manifest, [(int(m), v) for m in np.flatnonzero(keep)], policy=extract["policy"],
                                     view_seed=extract["view_seed"])) for v in ids]
    return (parts[0] if len(parts) == 1 else np.mean(parts, axis=0)), keep
