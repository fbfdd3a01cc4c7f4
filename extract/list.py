"""List the feature caches that exist, with their spec and size.

    python -m extract.list                 # caches under out/features
    python -m extract.list out/quick/features --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from extract.cache import describe
from study.config import REPO_ROOT

COLUMNS = ("key", "backbone", "weights", "views", "tta", "policy", "seed", "precision", "storage_dtype", "rows", "dim",
           "complete", "size_mb", "manifest_hash")


def list_caches(cache_dir: str | Path) -> list[dict]:
    """One dict per ``*.h5`` in ``cache_dir`` (unreadable files included, with an ``error``), plus partial runs."""
    cache_dir = Path(cache_dir)
    rows = [describe(p) for p in sorted(cache_dir.glob("*.h5"))]
    for parts in sorted(cache_dir.glob(".*.parts")):
        n_parts = len(list(parts.glob("rows-*.npy")))
        rows.append({"key": parts.name[1:-len(".parts")], "complete": False, "path": str(parts),
                     "size_mb": round(sum(p.stat().st_size for p in parts.iterdir()) / 2**20, 2),
                     "error": f"partial extraction: {n_parts} batches done; rerun the extract stage to finish"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache_dir", nargs="?", default=str(REPO_ROOT / "out" / "features"))
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = p.parse_args(argv)
    if not Path(args.cache_dir).is_dir():
        print(f"error: no cache folder {args.cache_dir}", file=sys.stderr)
        return 2
    rows = list_caches(args.cache_dir)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    if not rows:
        print(f"no feature caches in {args.cache_dir}")
        return 0
    table = pd.DataFrame(rows)
    table["key"] = table["key"].str[:12]
    cols = [c for c in COLUMNS if c in table] + (["error"] if "error" in table else [])
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 60):
        print(table[cols].to_string(index=False))
    total = table["size_mb"].sum()
    print(f"{len(rows)} cache(s), {total:.1f} MiB in {args.cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
