"""The file index: what each file is (sha256, perceptual hash, size, mode, or why it is unusable).

Scanning decodes every image once, in parallel worker processes. Results are cached in a CSV, and a
cached row is trusted only while the file's (size, mtime_ns, ctime_ns) are those it was hashed
with, like git's index: ``os.utime`` can restore a rewritten file's mtime but not its ctime, so an
image re-encoded in place is re-hashed. A file whose stat changed is re-hashed (cheap) and decoded
only when its content is new: the description of a content is reused whatever its path, so a moved
or copied folder costs one read, not a decode. A row hashed within ``RACY_NS`` of the file's last
change is re-hashed next time (a change in the same clock tick would leave the stat equal). The
cache is saved every few thousand files, so an interrupted scan resumes where it stopped.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import pandas as pd
from tqdm.auto import tqdm

from dataset.images import ImageLoadError, probe
from study.atomic import atomic_path
from study.console import bars_shown
from study.hashing import file_sha256

log = logging.getLogger(__name__)
INDEX_COLUMNS = ("path", "size", "mtime_ns", "sha256", "phash", "phash256", "width", "height", "mode", "status",
                 "detail")
# Stored beside them: the ctime the row was hashed at, and when (ns since the epoch), to decide whether to trust it.
STORED_COLUMNS = (*INDEX_COLUMNS, "ctime_ns", "hashed_ns")
_DTYPES = {"path": str, "size": "int64", "mtime_ns": "int64", "sha256": str, "phash": str, "phash256": str,
           "width": "int64", "height": "int64", "mode": str, "status": str, "detail": str, "ctime_ns": "int64",
           "hashed_ns": "int64"}
# Coarser than any file system's timestamp tick (ext4 ~ms, FAT 2 s for mtime, ctime finer): a file changed
# less than this before it was hashed may change again with an equal stat, so its row is not trusted.
RACY_NS = 3_000_000_000
OK = "ok"
SAVE_EVERY = 2000
# Below this many files, starting worker processes costs more than it saves.
MIN_PARALLEL = 200


def describe_file(path: str) -> dict:
    """One index row: decode the file as the study will, and say what it is or why it is unusable."""
    st, hashed_ns = os.stat(path), time.time_ns()
    row = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": "", "phash": "", "phash256": "",
           "width": 0, "height": 0, "mode": "", "status": OK, "detail": "", "ctime_ns": st.st_ctime_ns,
           "hashed_ns": hashed_ns}
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
    return pd.DataFrame(columns=list(STORED_COLUMNS)).astype(_DTYPES)


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
    for col in set(STORED_COLUMNS) - set(df.columns):  # an index from before ctime was kept: re-hash, not decode
        df[col] = -1
    return df[list(STORED_COLUMNS)]


def _save(index_path: Path, frames: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat([f for f in frames if len(f)] or [_empty_index()], ignore_index=True)
    df = df.drop_duplicates("path", keep="last").sort_values("path", ignore_index=True)
    with atomic_path(index_path) as tmp:
        df.to_csv(tmp, index=False)
    return df


def _trusted(row, st: os.stat_result) -> bool:
    """Whether a cached row still describes the file: same stat, and hashed well after the file last changed."""
    return (row is not None and (row.size, row.mtime_ns, row.ctime_ns) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            and row.ctime_ns < row.hashed_ns - RACY_NS)


def _rehash(path: str) -> dict | None:
    st, hashed_ns = os.stat(path), time.time_ns()
    try:
        sha = file_sha256(path)
    except OSError:
        return None  # unreadable: describe_file records why
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "hashed_ns": hashed_ns, "sha256": sha}


def _known_contents(stale: list[str], cached: pd.DataFrame, *, workers: int) -> list[dict]:
    """Rows for stale files whose content (by sha256) the index already describes; the others need decoding."""
    described = cached[cached["sha256"] != ""].drop_duplicates("sha256", keep="last").set_index("sha256")
    if not stale or described.empty:
        return []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib releases the GIL on large buffers
        hashed = [h for h in pool.map(_rehash, stale) if h is not None and h["sha256"] in described.index]
    content = described[["phash", "phash256", "width", "height", "mode", "status", "detail"]].to_dict("index")
    return [{**h, **content[h["sha256"]]} for h in hashed]


def _pool_context():
    """fork where there is one (like torch's DataLoader): spawn would re-import the caller's __main__, which
    breaks scripts without a main guard and piped scripts; the workers use only PIL, hashlib and numpy."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _describe_all(todo: list[str], *, workers: int, on_batch) -> None:
    bar = tqdm(total=len(todo), desc="scan images", unit="img", disable=None if bars_shown() else True)
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
    """Index rows for ``paths`` (in that order), decoding only files whose content the cached index does not know."""
    keys = [str(p) for p in paths]
    frames = [read_index(index_path)]
    known = {r.path: r for r in frames[0].itertuples(index=False)}
    stale = [k for k in keys if not _trusted(known.get(k), os.stat(k))]
    reused = _known_contents(stale, frames[0], workers=workers)
    done = {r["path"] for r in reused}
    todo = [k for k in stale if k not in done]
    log.info("file index: %d files, %d cached, %d re-hashed with known content, %d to scan", len(keys),
             len(keys) - len(stale), len(reused), len(todo))

    def save_batch(rows: list[dict]) -> None:
        frames.append(pd.DataFrame(rows, columns=list(STORED_COLUMNS)).astype(_DTYPES))
        frames[:] = [_save(index_path, frames)]
    if reused:
        save_batch(reused)
    if todo:
        _describe_all(todo, workers=workers, on_batch=save_batch)
    index = frames[0].set_index("path")
    return index.loc[keys, list(INDEX_COLUMNS[1:])].reset_index()
