"""List the activation store's entries (backbone, layer, rows by view kind, bytes per row and on disk), or prune one.

    python -m extract.list                      # entries under out/store
    python -m extract.list out/quick/store --json
    python -m extract.list out/store --prune 3f2a9c   # delete the entry whose key starts with 3f2a9c
    python -m extract.list out/store --verify   # read every segment through its checksums
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from extract.store import Store, StoreDamaged, describe, remove_files, replacing
from study.config import REPO_ROOT

COLUMNS = ("key", "backbone", "layer", "precision", "storage_dtype", "rows", "clean", "hflip", "aug",
           "bytes_per_row", "disk_mb")


def entry_dirs(store_dir: str | Path) -> list[Path]:
    """Every entry folder, also one whose spec.json is damaged or gone (those are listed with an error)."""
    return sorted(p for p in Path(store_dir).iterdir() if p.is_dir() and not p.name.startswith("."))


def list_entries(store_dir: str | Path) -> list[dict]:
    return [describe(p) for p in entry_dirs(store_dir)]


def verify(entry: Path) -> str:
    """'ok', or what is damaged: every segment's columns read through their checksums and digests, one
    segment at a time (an entry of fine-tune activations can be larger than memory)."""
    try:
        store = Store.open(entry)
        index = store.index()
        by_segment: dict = {}
        for key, (seg, _, _) in index.rows.items():
            by_segment.setdefault(seg, []).append(key)
        for keys in by_segment.values():
            store.read(keys, index)
    except StoreDamaged as exc:
        return str(exc)
    return "ok"


def prune(store_dir: str | Path, prefix: str) -> Path:
    """Delete the one entry whose key starts with ``prefix`` (an ambiguous or unknown prefix is an error)."""
    import shutil

    from study.atomic import file_lock

    matches = [p for p in entry_dirs(store_dir) if p.name.startswith(prefix)]
    if len(matches) != 1:
        raise ValueError(f"--prune {prefix!r} matches {len(matches)} entries in {store_dir}; give a longer key prefix "
                         "(see the listing)")
    # Not while a study writes to it, nor while one reads it: a reader waits instead of meeting half an entry.
    with file_lock(matches[0] / ".lock", what="pruning"), replacing(matches[0]):
        remove_files(matches[0])
    shutil.rmtree(matches[0])
    return matches[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store_dir", nargs="?", default=str(REPO_ROOT / "out" / "store"))
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.add_argument("--prune", metavar="KEY_PREFIX", help="delete the entry whose key starts with this")
    p.add_argument("--verify", action="store_true", help="read every row through its checksums and digests")
    args = p.parse_args(argv)
    if not Path(args.store_dir).is_dir():
        print(f"error: no store folder {args.store_dir}", file=sys.stderr)
        return 2
    if args.prune:
        try:
            print(f"removed {prune(args.store_dir, args.prune)}")
        except (ValueError, StoreDamaged) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    rows = list_entries(args.store_dir)
    if args.verify:
        for row in rows:
            row["verified"] = verify(Path(row["path"]))
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    if not rows:
        print(f"no store entries in {args.store_dir}")
        return 0
    table = pd.DataFrame(rows)
    table["key"] = table["key"].str[:12]
    cols = [c for c in (*COLUMNS, "verified", "error") if c in table]
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 80):
        print(table[cols].to_string(index=False))
    print(f"{len(rows)} entries, {table['disk_mb'].sum():.1f} MiB in {args.store_dir}")
    return 1 if args.verify and any(r["verified"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
