"""The HDF5 feature cache: one file per key, spec in its attributes, validated on every read.

Layout of ``<cache_dir>/<key>.h5`` (DESIGN.md)::

    features   (N, D) float32 or float16, chunked by rows
    labels     (N,)   int64
    sample_id  (N,)   utf-8 strings
    view       (N,)   int16   0 = clean eval view, -1 = its mirror (tta="hflip"), 1..K = augmented views
    split      (N,)   utf-8 strings (train / val / test, copied from the manifest)
    attrs      spec_json (canonical JSON), key (= sha256 of spec_json), complete, n_rows, feature_dim

Row order is view-major: view 0 of every manifest row (manifest order), then the test-time view -1
of every row (when ``tta`` is "hflip"), then view 1 of the non-test rows, ..., then view K. The key
is the sha256 of the canonical JSON of everything that changes the numbers (``cache_spec``); reading
re-derives it and checks completeness, shapes and finiteness, and a spec that differs from the
expected one is an error naming every differing field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from study.hashing import canonical_json, spec_hash
from study.hashing import spec_differences as _spec_differences

FORMAT_VERSION = 1
READ_CHUNK_ROWS = 8192  # bounds memory of the finiteness scan on huge caches


class CacheMismatch(ValueError):
    """A cache whose spec, rows or contents are not what the caller expects."""


@dataclass
class FeatureSet:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    sample_id: np.ndarray  # (N,) str
    view: np.ndarray  # (N,) int
    spec: dict
    key: str
    path: Path
    split: np.ndarray | None = None  # (N,) str, from the manifest
    extract_s: float | None = None  # wall seconds the extraction took (all rows, all views)


def library_versions() -> dict:
    """Versions of the libraries whose numerics shape the features."""
    import PIL
    import timm
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__}


def cache_spec(*, backbone_spec: dict, views: int, policy_spec: dict, seed: int, manifest_hash: str,
               storage_dtype: str, precision: str, channels_last: bool, tta: str = "none") -> dict:
    """Everything that changes a cache's numbers; its sha256 is the cache key."""
    return {
        "format": FORMAT_VERSION,
        "backbone": backbone_spec,
        "views": views,
        "tta": tta,
        "policy": policy_spec,
        "seed": seed,
        "manifest_hash": manifest_hash,
        "storage_dtype": storage_dtype,
        "precision": precision,
        "channels_last": channels_last,
        "versions": library_versions(),
    }


def cache_key(spec: dict) -> str:
    return spec_hash(spec)


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.h5"


def spec_differences(expected: dict, actual: dict) -> list[str]:
    return _spec_differences(expected, actual, labels=("expected", "cache has"))


def _normalised(spec: dict) -> dict:
    """The spec as it reads back from JSON (tuples -> lists), so comparisons are like with like."""
    return json.loads(canonical_json(spec))


def write_cache(path: Path, *, spec: dict, n_rows: int, feature_dim: int, labels: np.ndarray,
                sample_id: np.ndarray, view: np.ndarray, split: np.ndarray,
                feature_blocks, extract_s: float | None = None) -> None:
    """Write a complete cache at ``path`` (callers pass a temporary path and ``os.replace`` it).

    ``feature_blocks`` yields (start_row, float32 array) blocks covering all rows, so memory
    stays bounded by one block whatever the dataset size.
    """
    dtype = np.dtype(spec["storage_dtype"])
    chunk_rows = max(1, min(n_rows, (1 << 20) // (feature_dim * dtype.itemsize)))
    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", shape=(n_rows, feature_dim), dtype=dtype,
                                 chunks=(chunk_rows, feature_dim) if n_rows else None)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("sample_id", data=np.asarray(sample_id, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("view", data=np.asarray(view, dtype=np.int16))
        f.create_dataset("split", data=np.asarray(split, dtype=object), dtype=h5py.string_dtype())
        written = 0
        for start, block in feature_blocks:
            if start != written:
                raise RuntimeError(f"feature blocks out of order: expected row {written}, got {start}")
            feats[start:start + len(block)] = block.astype(dtype)
            written += len(block)
        if written != n_rows:
            raise RuntimeError(f"feature blocks cover {written} rows of {n_rows}")
        text = canonical_json(spec)
        f.attrs.update({"spec_json": text, "key": spec_hash(spec), "n_rows": n_rows,
                        "feature_dim": feature_dim, "complete": True})
        if extract_s is not None:  # cost, not identity: kept out of the spec and the key
            f.attrs["extract_s"] = float(extract_s)


def read_spec(path: str | Path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["spec_json"])


def check_cache(path: str | Path, *, expected_spec: dict | None = None,
                expected_sample_id: np.ndarray | None = None, expected_view: np.ndarray | None = None) -> dict:
    """Validate a cache file without loading its features into memory; return its spec.

    Checks: complete, key = sha256(spec_json) = file name, expected spec (every differing field
    named), row identity and order, shapes, finiteness. Raises CacheMismatch on any failure.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no feature cache at {path}; run the extract stage")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheMismatch(f"{path} is not a readable HDF5 file ({exc}); delete it or rerun with --rebuild-cache") from exc
    with f:
        problems = _structure_problems(f)
        if problems:
            raise CacheMismatch(f"feature cache {path} is invalid: " + "; ".join(problems)
                                + ". Delete it or rerun with --rebuild-cache")
        spec = json.loads(f.attrs["spec_json"])
        _check_key(path, f, spec)
        if expected_spec is not None:
            diffs = spec_differences(_normalised(expected_spec), spec)
            if diffs:
                raise CacheMismatch(f"feature cache {path} was built with a different spec; differing fields: "
                                    + "; ".join(diffs) + ". Rerun with --rebuild-cache to rebuild it")
        _check_rows(path, f, expected_sample_id, expected_view)
        _check_finite(path, f["features"])
    return spec


def _structure_problems(f: h5py.File) -> list[str]:
    problems = [f"missing dataset {name!r}" for name in ("features", "labels", "sample_id", "view")
                if name not in f]
    problems += [f"missing attribute {name!r}" for name in ("spec_json", "key") if name not in f.attrs]
    if problems:
        return problems
    if not f.attrs.get("complete", False):
        problems.append("it is incomplete (an interrupted write)")
    n = f["features"].shape[0]
    if f["features"].ndim != 2:
        problems.append(f"features has shape {f['features'].shape}, expected (N, D)")
    problems += [f"{name} has {f[name].shape[0]} rows but features has {n}"
                 for name in ("labels", "sample_id", "view", "split") if name in f and f[name].shape[0] != n]
    return problems


def _check_key(path: Path, f: h5py.File, spec: dict) -> None:
    derived = spec_hash(spec)
    if derived != f.attrs["key"] or derived != path.stem:
        raise CacheMismatch(f"feature cache {path}: its spec hashes to {derived}, but it is stored as key "
                            f"{f.attrs['key']} in file {path.name}; the file was altered or misnamed. "
                            "Delete it or rerun with --rebuild-cache")


def _check_rows(path: Path, f: h5py.File, sample_id, view) -> None:
    if sample_id is None:
        return
    cached_ids = f["sample_id"].asstr()[:]
    cached_view = f["view"][:]
    if len(cached_ids) != len(sample_id):
        raise CacheMismatch(f"feature cache {path} has {len(cached_ids)} rows, expected {len(sample_id)}")
    bad = np.flatnonzero((cached_ids != np.asarray(sample_id)) | (cached_view != np.asarray(view)))
    if bad.size:
        i = bad[0]
        raise CacheMismatch(f"feature cache {path}: row {i} is ({str(cached_ids[i])!r}, view {int(cached_view[i])}), expected "
                            f"({str(sample_id[i])!r}, view {int(view[i])}); {bad.size} rows differ. Rerun with --rebuild-cache")


def _check_finite(path: Path, feats: h5py.Dataset) -> None:
    for start in range(0, feats.shape[0], READ_CHUNK_ROWS):
        block = feats[start:start + READ_CHUNK_ROWS]
        if not np.isfinite(block).all():
            row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise CacheMismatch(f"feature cache {path} has non-finite features (first at row {row}); "
                                "rerun with --rebuild-cache (and precision = \"fp32\" if it recurs)")


def load_features(path: str | Path, *, expected_spec: dict | None = None) -> FeatureSet:
    """Read a validated cache: float32 features, labels, sample ids, views, split, spec and key."""
    path = Path(path)
    spec = check_cache(path, expected_spec=expected_spec)
    with h5py.File(path, "r") as f:
        return FeatureSet(
            features=f["features"][:].astype(np.float32, copy=False),
            labels=f["labels"][:].astype(np.int64, copy=False),
            sample_id=f["sample_id"].asstr()[:].astype(str),
            view=f["view"][:].astype(np.int64),
            spec=spec,
            key=str(f.attrs["key"]),
            path=path,
            split=f["split"].asstr()[:].astype(str) if "split" in f else None,
            extract_s=float(f.attrs["extract_s"]) if "extract_s" in f.attrs else None,
        )


def describe(path: str | Path) -> dict:
    """A one-line summary of a cache (for listing): key, backbone, views, rows, completeness, size."""
    path = Path(path)
    info = {"path": str(path), "size_mb": round(path.stat().st_size / 2**20, 2)}
    try:
        with h5py.File(path, "r") as f:
            spec = json.loads(f.attrs["spec_json"])
            info.update(key=str(f.attrs.get("key", "?")), complete=bool(f.attrs.get("complete", False)),
                        rows=int(f["features"].shape[0]), dim=int(f["features"].shape[1]))
    except (OSError, KeyError, ValueError) as exc:
        info.update(error=f"unreadable: {exc}")
        return info
    backbone = spec.get("backbone", {})
    info.update(backbone=backbone.get("name"), weights=backbone.get("weights"), views=spec.get("views"),
                tta=spec.get("tta", "none"), policy=(spec.get("policy") or {}).get("name"), seed=spec.get("seed"),
                precision=spec.get("precision"), storage_dtype=spec.get("storage_dtype"),
                manifest_hash=str(spec.get("manifest_hash", ""))[:12])
    return info
