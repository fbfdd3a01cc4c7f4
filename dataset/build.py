"""Build the study's dataset: sources -> file index -> exclusions -> class mapping -> de-duplication -> splits.

``build_dataset`` writes into ``out_dir``: manifest.csv, summary.json/.md/.csv, excluded.csv,
duplicates.csv, contact_sheet.png, augmentations.png, plus file_index.csv (the scan cache) and
build.json (what the outputs were built from: a rebuild with the same inputs returns at once).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from dataset import splits as splitting
from dataset.classmap import map_classes
from dataset.dedup import find_duplicates
from dataset.index import OK, scan_files
from dataset.manifest import COLUMNS, write_manifest
from dataset.sources import ResolvedSource, SourceFile, list_source_files, resolve_source
from dataset.summary import write_summary
from study.atomic import write_text_atomic
from study.hashing import spec_hash

log = logging.getLogger(__name__)
BUILD_VERSION = 1  # bump when the build's logic changes what it writes


@dataclass(frozen=True)
class DatasetBuild:
    manifest_path: Path
    manifest_hash: str
    summary_path: Path
    n_images: int
    n_classes: int
    n_excluded: int
    n_duplicates: int
    reused: bool = False  # True when out_dir already held this exact build


def _download_dir(data_cfg: dict, out_dir: Path) -> Path:
    return Path(data_cfg["download_dir"]) if data_cfg["download_dir"] else out_dir.parent / "downloads"


def _manifest_path_of(path: Path, root_prefix: str) -> str:
    """Relative to the data root when under it (the manifest moves with its data), else absolute."""
    text = str(path)
    return text[len(root_prefix):] if text.startswith(root_prefix) else text


def _file_table(files: list[SourceFile], index: pd.DataFrame, *, data_root: Path, source_order: dict) -> pd.DataFrame:
    df = index.copy()
    df["source"] = [f.source for f in files]
    df["folder"] = [f.folder for f in files]
    df["sample_id"] = [f.sample_id for f in files]
    df["abs_path"] = df["path"]
    root_prefix = str(data_root).rstrip(os.sep) + os.sep
    df["path"] = [_manifest_path_of(f.path, root_prefix) for f in files]
    df["source_rank"] = df["source"].map(source_order)
    return df.sort_values(["source_rank", "sample_id"], ignore_index=True)


def _split_classes(kept: pd.DataFrame, *, split_cfg: dict, seed: int) -> tuple[pd.DataFrame, list[dict]]:
    """Assign splits per final class; classes with too few images raise or are dropped (recorded)."""
    split_of, dropped = {}, []
    for name, group in kept.groupby("class_name", sort=True):
        assigned = splitting.assign_splits(group["sample_id"].tolist(), class_name=name, split_cfg=split_cfg, seed=seed)
        if assigned is None:
            count = (f"{len(group)} images after exclusions and de-duplication; the {split_cfg['protocol']} "
                     f"protocol needs {splitting.needed_images(split_cfg)}")
            if split_cfg["too_few"] == "error":
                raise splitting.TooFewImages(f"class '{name}' has {count}. Set data.split.too_few = \"drop\" "
                                             "to drop such classes, or change data.split.")
            dropped.append({"name": name, "reason": f"too few images: {count}"})
            continue
        split_of.update(assigned)
    out = kept[kept["sample_id"].isin(split_of)].copy()
    out["split"] = out["sample_id"].map(split_of)
    return out, dropped


def _inputs_key(*, data_cfg: dict, seed: int, data_root: Path, files: list[SourceFile]) -> str:
    """What a build depends on: config, seed, code version and every file's (path, size, mtime)."""
    stats = []
    for f in files:
        st = os.stat(f.path)
        stats.append((f.sample_id, str(f.path), st.st_size, st.st_mtime_ns))
    return spec_hash({"version": BUILD_VERSION, "data": data_cfg, "seed": seed, "data_root": str(data_root),
                      "files": stats})


def _record(out_dir: Path, *, key: str, build: DatasetBuild, outputs: list[str]) -> None:
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(build).items() if k != "reused"}
    write_text_atomic(out_dir / "build.json", json.dumps({"inputs_key": key, "outputs": outputs, "build": fields},
                                                         indent=1))


def _reuse(out_dir: Path, key: str) -> DatasetBuild | None:
    record = out_dir / "build.json"
    if not record.is_file():
        return None
    try:
        saved = json.loads(record.read_text())
    except json.JSONDecodeError:
        return None
    if saved.get("inputs_key") != key or not all((out_dir / f).is_file() for f in saved.get("outputs", [])):
        return None
    fields = saved["build"]
    fields.update(manifest_path=Path(fields["manifest_path"]), summary_path=Path(fields["summary_path"]), reused=True)
    return DatasetBuild(**fields)


def resolve_all(data_cfg: dict, *, data_root: Path, out_dir: Path) -> list[ResolvedSource]:
    """Every source's folder (downloading where configured) before any work; the first missing one is an error."""
    if not data_cfg["sources"]:
        raise ValueError("data.sources is empty; add at least one [[data.sources]] table (see configs/default.toml)")
    names = [s["name"] for s in data_cfg["sources"]]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources names must be unique; got {names}")
    download_dir = _download_dir(data_cfg, out_dir)
    return [resolve_source(s, data_root=data_root, download_dir=download_dir) for s in data_cfg["sources"]]


def _apply_class_map(table: pd.DataFrame, data_cfg: dict) -> tuple[pd.DataFrame, list[dict], list[str]]:
    """Usable rows with their final class_name (config-dropped classes removed), the drops, unused map keys."""
    folders = sorted(set(zip(table["source"], table["folder"])))
    final, dropped, unused = map_classes(folders, rename=data_cfg["rename"], drop=data_cfg["drop"])
    for k in unused:
        log.warning("data.rename/drop key %r matches no class folder of the configured sources", k)
    usable = table[table["status"] == OK]
    usable = usable.assign(class_name=[final[(s, f)] for s, f in zip(usable["source"], usable["folder"])])
    return usable[usable["class_name"].notna()].reset_index(drop=True), dropped, unused


def _dedup_and_split(usable: pd.DataFrame, *, data_cfg: dict, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """(manifest rows with split and label, duplicates table, classes dropped for too few images)."""
    dedup = data_cfg["dedup"]
    keep, duplicates = find_duplicates(usable, near_distance=dedup["near_distance"],
                                       confirm_distance=dedup["confirm_distance"])
    same_split = dedup["policy"] == "same_split"
    duplicates["action"] = "kept in the same split" if same_split else "dropped"
    split_df, too_few = _split_classes(usable if same_split else usable[keep], split_cfg=data_cfg["split"], seed=seed)
    if same_split:
        split_of = splitting.keep_groups_together(
            dict(zip(split_df["sample_id"], split_df["split"])),
            copies=list(zip(duplicates["kept"], duplicates["dropped"])),
            class_of=dict(zip(split_df["sample_id"], split_df["class_name"])))
        split_df["split"] = split_df["sample_id"].map(split_of)
    names = sorted(split_df["class_name"].unique())
    split_df["label"] = split_df["class_name"].map({n: i for i, n in enumerate(names)}).astype("int64")
    return split_df.sort_values(["label", "sample_id"], ignore_index=True), duplicates, too_few


def build_dataset(*, data_cfg: dict, data_root: Path, out_dir: Path, seed: int, reuse: bool = True) -> DatasetBuild:
    """Build (or, with ``reuse`` and unchanged inputs, reuse) the manifest and its summary in ``out_dir``."""
    data_root, out_dir = Path(os.path.abspath(data_root)), Path(os.path.abspath(out_dir))
    splitting.check_split_config(data_cfg["split"])
    resolved = resolve_all(data_cfg, data_root=data_root, out_dir=out_dir)
    files = [f for src, res in zip(data_cfg["sources"], resolved) for f in list_source_files(src, res)]
    key = _inputs_key(data_cfg=data_cfg, seed=seed, data_root=data_root, files=files)
    if reuse and (previous := _reuse(out_dir, key)) is not None:
        log.info("dataset: reusing the build in %s (same config, seed and files)", out_dir)
        return previous

    index = scan_files([f.path for f in files], index_path=out_dir / "file_index.csv", workers=data_cfg["workers"])
    table = _file_table(files, index, data_root=data_root,
                        source_order={s["name"]: i for i, s in enumerate(data_cfg["sources"])})
    usable, config_dropped, unused = _apply_class_map(table, data_cfg)
    manifest, duplicates, too_few_dropped = _dedup_and_split(usable, data_cfg=data_cfg, seed=seed)

    # The old record goes first: a build interrupted below must not leave it vouching for new files.
    (out_dir / "build.json").unlink(missing_ok=True)
    manifest_path = out_dir / "manifest.csv"
    manifest_hash = write_manifest(manifest[list(COLUMNS)], manifest_path)
    excluded = table[table["status"] != OK]
    outputs = write_summary(
        out_dir=out_dir, manifest=manifest, manifest_hash=manifest_hash, table=table, excluded=excluded,
        duplicates=duplicates, usable=usable, dropped_classes=config_dropped + too_few_dropped,
        unused_mapping=unused, resolved=resolved, data_cfg=data_cfg, seed=seed, data_root=data_root)
    build = DatasetBuild(manifest_path=manifest_path, manifest_hash=manifest_hash,
                         summary_path=out_dir / "summary.json", n_images=len(manifest),
                         n_classes=int(manifest["label"].nunique()), n_excluded=len(excluded),
                         n_duplicates=len(duplicates))
    _record(out_dir, key=key, build=build, outputs=["manifest.csv", *outputs])
    log.info("dataset: %d images, %d classes, %d excluded, %d duplicates (policy %s) -> %s", build.n_images,
             build.n_classes, build.n_excluded, build.n_duplicates, data_cfg["dedup"]["policy"], manifest_path)
    return build
