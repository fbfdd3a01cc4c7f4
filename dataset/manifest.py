"""The manifest: one row per image with its split, and the hash that names it.

Columns (DESIGN.md): sample_id, path, source, label, class_name, split, sha256, width, height, mode.
``path`` is relative to the data root, so a manifest moves with its data. The manifest hash is
the sha256 of the canonical JSON of the rows' (sample_id, label, sha256, split), sorted by
sample_id: it changes exactly when an image, a label or a split changes.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from study.atomic import atomic_path
from study.cells import neutralise_frame, restore_frame
from study.hashing import spec_hash

COLUMNS = ("sample_id", "path", "source", "label", "class_name", "split", "sha256", "width", "height", "mode")
SPLITS = ("train", "val", "test")
_DTYPES = {"sample_id": str, "path": str, "source": str, "label": "int64", "class_name": str, "split": str,
           "sha256": str, "width": "int64", "height": "int64", "mode": str}


def manifest_hash(df: pd.DataFrame) -> str:
    rows = df.sort_values("sample_id")[["sample_id", "label", "sha256", "split"]]
    return spec_hash([[r.sample_id, int(r.label), r.sha256, r.split] for r in rows.itertuples(index=False)])


def check_manifest(df: pd.DataFrame, *, where: str = "manifest") -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{where} lacks columns {missing}")
    if df["sample_id"].duplicated().any():
        dup = df.loc[df["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise ValueError(f"{where} has duplicate sample_id {dup!r}")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"{where} has split values {bad}; allowed: {SPLITS}")
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> str:
    """Write atomically; return the manifest hash."""
    df = check_manifest(df[list(COLUMNS)].reset_index(drop=True))
    with atomic_path(path) as tmp:
        neutralise_frame(df).to_csv(tmp, index=False)  # a class folder named "=..." opens as text
    return manifest_hash(df)


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}; run the dataset stage first (--stages dataset)")
    df = restore_frame(pd.read_csv(path, dtype=_DTYPES, keep_default_na=False))
    return check_manifest(df, where=str(path))


def class_names(df: pd.DataFrame) -> list[str]:
    """Class names indexed by label."""
    pairs = df[["label", "class_name"]].drop_duplicates().sort_values("label")
    if pairs["label"].tolist() != list(range(len(pairs))):
        raise ValueError("manifest labels are not 0..C-1 with one name each")
    return pairs["class_name"].tolist()


def smallest_classes(manifest, n: int):
    """A quick-check subset: the ``n`` classes with the fewest images (ties by label), relabelled 0..n-1."""
    if not n:
        return manifest
    sizes = manifest.groupby("label").size().reset_index(name="n").sort_values(["n", "label"])
    keep = sorted(sizes["label"].head(n))
    sub = manifest[manifest["label"].isin(keep)].reset_index(drop=True)
    sub["label"] = sub["label"].map({old: new for new, old in enumerate(keep)})
    return sub
