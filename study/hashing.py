"""Canonical JSON and its sha256: the one way the study turns a spec into a key."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, tuples as lists: equal specs give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot hash a {type(obj).__name__} in a spec: {obj!r}")


def spec_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def spec_differences(expected: dict, actual: dict, *, labels: tuple[str, str] = ("expected", "found"),
                     prefix: str = "") -> list[str]:
    """One line per differing field, dotted (nested dicts compared field by field), e.g.
    ``data_config.crop_size: expected 224, cache has 240`` with ``labels=("expected", "cache has")``."""
    diffs = []
    for name in sorted(set(expected) | set(actual)):
        dotted = f"{prefix}{name}"
        a, b = expected.get(name, "<absent>"), actual.get(name, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += spec_differences(a, b, labels=labels, prefix=f"{dotted}.")
        elif a != b:
            diffs.append(f"{dotted}: {labels[0]} {a!r}, {labels[1]} {b!r}")
    return diffs
