"""Build the study's dataset: sources -> file index -> exclusions -> class mapping -> de-duplication -> splits.

``build_dataset`` writes into ``out_dir``: manifest.csv, summary.json/.md/.csv, excluded.csv,
duplicates.csv, contact_sheet.png, augmentations.png, plus file_index.csv (the scan cache) and
build.json (what the outputs were built from: a rebuild with the same inputs returns at once).
build.json names its outputs relative to ``out_dir``, so a moved or copied ``--out`` reuses its
own files and never reads the folder it was copied from.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dataset import splits as splitting
from dataset.classmap import map_classes
from dataset.config import check_data
from dataset.dedup import find_duplicates
from dataset.index import INDEX_COLUMNS, OK, RACY_NS, scan_files
from dataset.manifest import COLUMNS, write_manifest
from dataset.sources import (
    ResolvedSource,
    SourceFile,
    SourceListing,
    check_source,
    list_source_files,
    printable,
    resolve_source,
)
from dataset.summary import write_summary
from study.atomic import write_text_atomic
from study.hashing import spec_hash
from study.schema import ConfigError

log = logging.getLogger(__name__)
BUILD_VERSION = 2  # bump when the build's logic changes what it writes


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
    text = printable(str(path))
    return text[len(root_prefix):] if text.startswith(root_prefix) else text


def _problem_rows(files: list[SourceFile]) -> pd.DataFrame:
    """Index-like rows for listed entries that cannot be read as files: excluded with the listing's reason."""
    rows = [{"path": printable(str(f.path)), "size": 0, "mtime_ns": 0, "sha256": "", "phash": "", "phash256": "",
             "width": 0, "height": 0, "mode": "", "status": f.problem, "detail": f.detail} for f in files]
    return pd.DataFrame(rows, columns=list(INDEX_COLUMNS))


def _file_table(files: list[SourceFile], *, index_path: Path, workers: int, data_root: Path,
                source_order: dict) -> pd.DataFrame:
    readable = [f for f in files if not f.problem]
    index = scan_files([f.path for f in readable], index_path=index_path, workers=workers)
    problems = [f for f in files if f.problem]
    df = pd.concat([index, _problem_rows(problems)], ignore_index=True) if problems else index.copy()
    ordered = readable + problems
    df["source"] = [f.source for f in ordered]
    df["folder"] = [f.folder for f in ordered]
    df["sample_id"] = [f.sample_id for f in ordered]
    df["abs_path"] = df["path"]
    root_prefix = str(data_root).rstrip(os.sep) + os.sep
    df["path"] = [_manifest_path_of(f.path, root_prefix) for f in ordered]
    df["source_rank"] = df["source"].map(source_order)
    return df.sort_values(["source_rank", "sample_id"], ignore_index=True)


def _split_classes(kept: pd.DataFrame, *, split_cfg: dict, seed: int) -> tuple[pd.DataFrame, list[dict]]:
    """Assign splits per final class; classes with too few images raise or are dropped (recorded). The error says
    which values of data.split would fit this data."""
    split_of, dropped = {}, []
    sizes = kept.groupby("class_name").size()
    if len(sizes) < 2:
        raise splitting.TooFewImages(f"the data has {len(sizes)} class{'es' if len(sizes) != 1 else ''} with usable "
                                     "images; a study needs at least 2: add class folders (one sub-folder per "
                                     "class)")
    for name, group in kept.groupby("class_name", sort=True):
        assigned = splitting.assign_splits(group["sample_id"].tolist(), class_name=name, split_cfg=split_cfg, seed=seed)
        if assigned is None:
            count = (f"{len(group)} image{'s' if len(group) != 1 else ''} after exclusions and de-duplication; "
                     f"the {split_cfg['protocol']} protocol needs {splitting.needed_images(split_cfg)}")
            if split_cfg["too_few"] == "error":
                raise splitting.TooFewImages(f"class '{name}' has {count}; "
                                             f"{splitting.split_advice(sizes.to_numpy(), split_cfg)}")
            dropped.append({"name": name, "reason": f"too few images: {count}"})
            continue
        split_of.update(assigned)
    left = len(sizes) - len(dropped)
    if left < 2:  # a classifier needs two classes: say what would keep them, before any picture or file is made
        raise splitting.TooFewImages(f"data.split.too_few = \"drop\" leaves {left} of {len(sizes)} classes; a study "
                                     f"needs at least 2: {splitting.split_advice(sizes.to_numpy(), split_cfg)}")
    out = kept[kept["sample_id"].isin(split_of)].copy()
    out["split"] = out["sample_id"].map(split_of)
    return out, dropped


def _inputs_key(*, data_cfg: dict, seed: int, data_root: Path, listings: list[SourceListing]) -> str | None:
    """What a build depends on: config, seed, code version, the class folders and every file's (path, size,
    mtime, ctime) (ctime: ``os.utime`` cannot restore it, so a file rewritten in place changes the key).
    None when a file changed too recently for its stat to vouch for its content (see dataset/index.py)."""
    entries, newest = [], 0
    for listing in listings:
        for f in listing.files:
            if f.problem:
                entries.append((f.sample_id, f.problem))
                continue
            st = os.stat(f.path)
            entries.append((f.sample_id, str(f.path), st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            newest = max(newest, st.st_ctime_ns)
    if newest >= time.time_ns() - RACY_NS:
        return None
    return spec_hash({"version": BUILD_VERSION, "data": data_cfg, "seed": seed, "data_root": str(data_root),
                      "folders": [listing.folders for listing in listings], "files": entries})


def _record(out_dir: Path, *, key: str | None, build: DatasetBuild, outputs: list[str]) -> None:
    # File names relative to out_dir: an absolute path would send a moved --out to the old place.
    fields = {"manifest_hash": build.manifest_hash, "n_images": build.n_images, "n_classes": build.n_classes,
              "n_excluded": build.n_excluded, "n_duplicates": build.n_duplicates}
    write_text_atomic(out_dir / "build.json", json.dumps({"inputs_key": key, "outputs": outputs, "build": fields},
                                                         indent=1))


def _reuse(out_dir: Path, key: str | None) -> DatasetBuild | None:
    record = out_dir / "build.json"
    if key is None or not record.is_file():
        return None
    try:
        saved = json.loads(record.read_text())
    except json.JSONDecodeError:
        return None
    if saved.get("inputs_key") != key or not all((out_dir / f).is_file() for f in saved.get("outputs", [])):
        return None
    fields = {k: v for k, v in saved["build"].items() if k not in ("manifest_path", "summary_path")}
    return DatasetBuild(manifest_path=out_dir / "manifest.csv", summary_path=out_dir / "summary.json", reused=True,
                        **fields)


def resolve_all(data_cfg: dict, *, data_root: Path, out_dir: Path) -> list[ResolvedSource]:
    """Every source's folder (downloading where configured) before any work; the first missing one is an error."""
    if not data_cfg["sources"]:
        raise ConfigError("config key 'data.sources' is empty; allowed: at least one [[data.sources]] table "
                          "(see configs/default.toml)")
    download_dir = _download_dir(data_cfg, out_dir)
    return [resolve_source(s, data_root=data_root, download_dir=download_dir) for s in data_cfg["sources"]]


def check_sources(data_cfg: dict, *, data_root: Path, out_dir: Path) -> None:
    """Before any stage runs: what the config and a listing of the source folders show is wrong (no download)."""
    if not data_cfg["sources"]:
        raise ConfigError("config key 'data.sources' is empty; allowed: at least one [[data.sources]] table "
                          "(see configs/default.toml)")
    download_dir = _download_dir(data_cfg, out_dir)
    for i, src in enumerate(data_cfg["sources"]):
        check_source(src, key=f"data.sources[{i}]", data_root=data_root, download_dir=download_dir)


def _unusable_folders(listings: list[SourceListing], table: pd.DataFrame, usable: pd.DataFrame,
                      config_dropped: list[dict]) -> list[dict]:
    """Class folders that give no image at all (empty, or every file excluded): listed, never silently absent."""
    has_usable = set(zip(usable["source"], usable["folder"]))
    n_files = table.groupby(["source", "folder"]).size().to_dict()
    dropped_names = {d["name"] for d in config_dropped}
    out = []
    for listing in listings:
        source = listing.source
        for folder in listing.folders:
            if (source, folder) in has_usable or f"{source}/{folder}" in dropped_names:
                continue
            n = n_files.get((source, folder), 0)
            reason = (f"no usable images: all {n} files are excluded (see the excluded list)" if n else
                      "no usable images: the class folder is empty")
            out.append({"name": f"{source}/{folder}", "reason": reason,
                        "fix": "add images to the folder, or remove it (or list it in data.drop)"})
    return out


def _apply_class_map(table: pd.DataFrame, data_cfg: dict) -> tuple[pd.DataFrame, list[dict], list[str]]:
    """Usable rows with their final class_name (config-dropped classes removed), the drops, unused map keys."""
    folders = sorted(set(zip(table["source"], table["folder"])))
    final, dropped, unused = map_classes(folders, rename=data_cfg["rename"], drop=data_cfg["drop"])
    sources = {s["name"] for s in data_cfg["sources"]}
    for k in unused:  # a key of a source this config does not list came with a config it extends: no warning
        level = logging.WARNING if "/" not in k or k.split("/", 1)[0] in sources else logging.DEBUG
        log.log(level, "data.rename/drop key %r matches no class folder of the configured sources", k)
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


def build_dataset(*, data_cfg: dict, data_root: Path, out_dir: Path, seed: int, reuse: bool = True,
                  index_path: Path | None = None) -> DatasetBuild:
    """Build (or, with ``reuse`` and unchanged inputs, reuse) the manifest and its summary in ``out_dir``.

    ``index_path``: the file-scan cache (default ``out_dir/file_index.csv``); the builds of several split
    seeds share one, so each seed's build re-reads no image that an earlier one hashed."""
    data_root, out_dir = Path(os.path.abspath(data_root)), Path(os.path.abspath(out_dir))
    check_data(data_cfg, needs_val=False)
    resolved = resolve_all(data_cfg, data_root=data_root, out_dir=out_dir)
    listings = [list_source_files(src, res, key=f"data.sources[{i}]")
                for i, (src, res) in enumerate(zip(data_cfg["sources"], resolved))]
    files = [f for listing in listings for f in listing.files]
    key = _inputs_key(data_cfg=data_cfg, seed=seed, data_root=data_root, listings=listings)
    if reuse and (previous := _reuse(out_dir, key)) is not None:
        log.info("dataset: reusing the build in %s (same config, seed and files)", out_dir)
        return previous

    table = _file_table(files, index_path=index_path or out_dir / "file_index.csv", workers=data_cfg["workers"],
                        data_root=data_root, source_order={s["name"]: i for i, s in enumerate(data_cfg["sources"])})
    usable, config_dropped, unused = _apply_class_map(table, data_cfg)
    unusable = _unusable_folders(listings, table, usable, config_dropped)
    manifest, duplicates, too_few_dropped = _dedup_and_split(usable, data_cfg=data_cfg, seed=seed)

    # The old record goes first: a build interrupted below must not leave it vouching for new files.
    (out_dir / "build.json").unlink(missing_ok=True)
    manifest_path = out_dir / "manifest.csv"
    manifest_hash = write_manifest(manifest[list(COLUMNS)], manifest_path)
    excluded = table[table["status"] != OK]
    outputs = write_summary(
        out_dir=out_dir, manifest=manifest, manifest_hash=manifest_hash, table=table, excluded=excluded,
        duplicates=duplicates, usable=usable, dropped_classes=config_dropped + unusable + too_few_dropped,
        unused_mapping=unused, resolved=resolved, data_cfg=data_cfg, seed=seed, data_root=data_root)
    build = DatasetBuild(manifest_path=manifest_path, manifest_hash=manifest_hash,
                         summary_path=out_dir / "summary.json", n_images=len(manifest),
                         n_classes=int(manifest["label"].nunique()), n_excluded=len(excluded),
                         n_duplicates=len(duplicates))
    _record(out_dir, key=key, build=build, outputs=["manifest.csv", *outputs])
    log.info("dataset: %d images, %d classes, %d excluded, %d duplicates (policy %s) -> %s", build.n_images,
             build.n_classes, build.n_excluded, build.n_duplicates, data_cfg["dedup"]["policy"], manifest_path)
    return build
