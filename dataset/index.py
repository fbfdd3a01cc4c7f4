"""The file index: what each file is (sha256, perceptual hash, size, mode, or why it is unusable).

Scanning decodes every image once, in parallel worker processes. Results are cached in a CSV keyed
by (path, size, mtime_ns), so a rebuild only decodes new or changed files; the cache is saved
every few thousand files, so an interrupted scan resumes where it stopped.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

import imagehash
import pandas as pd
from tqdm.auto import tqdm

from dataset.images import ImageLoadError, probe
from study.atomic import atomic_path
from study.hashing import file_sha256

log = logging.getLogger(__name__)
INDEX_COLUMNS = ("path", "size", "mtime_ns", "sha256", "phash", "phash256", "width", "height", "mode", "status",
                 "detail")
_DTYPES = {"path": str, "size": "int64", "mtime_ns": "int64", "sha256": str, "phash": str, "phash256": str,
           "width": "int64", "height": "int64", "mode": str, "status": str, "detail": str}
OK = "ok"
SAVE_EVERY = 2000
# Below this many files, starting worker processes costs more than it saves.
MIN_PARALLEL = 200


def describe_file(path: str) -> dict:
    """One index row: decode the file as the study will, and say what it is or why it is unusable."""
    st = os.stat(path)
    row = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": "", "phash": "", "phash256": "",
           "width": 0, "height": 0, "mode": "", "status": OK, "detail": ""}
    try:
        row["sha256"] = file_sha256(path)
        rgb, info = probe(path)
        # Two perceptual hashes: the 64-bit one finds candidates fast, the 256-bit one confirms them
        # (64 bits alone cannot tell apart different motorbikes photographed side-on on white).
        grey = rgb.convert("L")  # what phash converts to anyway; done once for both hashes
        row.update(phash=str(imagehash.phash(grey)), phash256=str(imagehash.phash(grey, hash_size=16)),
                   width=info.width, height=info.height, mode=info.mode)
    except ImageLoadError as exc:
        row.update(status=exc.reason, detail=exc.detail[:200])
    except Exception as exc:  # noqa: BLE001 - one odd file must be recorded, not end an 11k-file scan
        row.update(status="unreadable", detail=f"{type(exc).__name__}: {exc}"[:200])
    return row


def _empty_index() -> pd.DataFrame:
    return pd.DataFrame(columns=list(INDEX_COLUMNS)).astype(_DTYPES)


def read_index(index_path: Path) -> pd.DataFrame:
    """The cached index, or an empty one when there is none or it cannot be read (then every file is rescanned)."""
    if not index_path.is_file():
        return _empty_index()
    try:
        df = pd.read_csv(index_path, dtype=_DTYPES, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        log.warning("file index %s is unreadable (%s); rescanning every file", index_path, exc)
        return _empty_index()
    if not set(INDEX_COLUMNS) <= set(df.columns):
        log.warning("file index %s has old columns; rescanning every file", index_path)
        return _empty_index()
    return df[list(INDEX_COLUMNS)]


def _save(index_path: Path, frames: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat([f for f in frames if len(f)] or [_empty_index()], ignore_index=True)
    df = df.drop_duplicates("path", keep="last").sort_values("path", ignore_index=True)
    with atomic_path(index_path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def _stale(paths: list[str], cached: pd.DataFrame) -> list[str]:
    """Paths whose (size, mtime_ns) differ from the cached row, or that have none."""
    stats = {p: os.stat(p) for p in paths}
    known = {r.path: (r.size, r.mtime_ns) for r in cached.itertuples(index=False)}
    return [p for p in paths if known.get(p) != (stats[p].st_size, stats[p].st_mtime_ns)]


def _pool_context():
    """fork where there is one (like torch's DataLoader): spawn would re-import the caller's __main__, which
    breaks scripts without a main guard and piped scripts; the workers use only PIL, hashlib and numpy."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _describe_all(todo: list[str], *, workers: int, on_batch) -> None:
    bar = tqdm(total=len(todo), desc="scan images", unit="img", disable=None)
    batch = []
    try:
        if workers > 1 and len(todo) >= MIN_PARALLEL:
            with _pool_context().Pool(workers) as pool:
                for row in pool.imap(describe_file, todo, chunksize=16):
                    batch.append(row)
                    bar.update()
                    if len(batch) >= SAVE_EVERY:
                        on_batch(batch)
                        batch = []
        else:
            for path in todo:
                batch.append(describe_file(path))
                bar.update()
    finally:  # also on Ctrl-C: what was scanned is saved, and the next build resumes after it
        bar.close()
        on_batch(batch)


def scan_files(paths: list[Path], *, index_path: Path, workers: int = 2) -> pd.DataFrame:
    """Index rows for ``paths`` (in that order), decoding only files the cached index does not know."""
    keys = [str(p) for p in paths]
    frames = [read_index(index_path)]
    todo = _stale(keys, frames[0])
    log.info("file index: %d files, %d cached, %d to scan", len(keys), len(keys) - len(todo), len(todo))
    if todo:
        def save_batch(rows: list[dict]) -> None:
            frames.append(pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).astype(_DTYPES))
            frames[:] = [_save(index_path, frames)]
        _describe_all(todo, workers=workers, on_batch=save_batch)
    index = frames[0].set_index("path")
    return index.loc[keys].reset_index()
