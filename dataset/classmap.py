"""The class mapping across sources: renames and drops from the config; equal final names are one class.

A key is ``"<source>/<folder>"`` (one source's folder) or a bare ``"<folder>"`` (in every source);
the source-qualified key wins. Keys that match no folder are reported, since they are usually typos.
"""
from __future__ import annotations


def _lookup(table, source: str, folder: str):
    qualified = f"{source}/{folder}"
    if qualified in table:
        return qualified
    return folder if folder in table else None


def map_classes(folders: list[tuple[str, str]], *, rename: dict, drop: list[str]) -> tuple[dict, list[dict], list[str]]:
    """(source, folder) pairs -> ({(source, folder): final name or None if dropped}, dropped, unused keys)."""
    used: set[str] = set()
    final, dropped = {}, []
    for source, folder in folders:
        drop_key = _lookup(set(drop), source, folder)
        if drop_key is not None:
            used.add(drop_key)
            final[(source, folder)] = None
            dropped.append({"name": f"{source}/{folder}", "reason": f"dropped by config (data.drop: {drop_key!r})"})
            continue
        rename_key = _lookup(rename, source, folder)
        if rename_key is not None:
            used.add(rename_key)
        final[(source, folder)] = rename[rename_key] if rename_key is not None else folder
    unused = sorted((set(rename) | set(drop)) - used)
    return final, dropped, unused
