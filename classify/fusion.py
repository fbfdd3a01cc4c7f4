"""Fused feature sets: several backbones' pooled features of the same rows, concatenated.

A fused set is offered to every head and chosen on val like any other. Each part is normalised the
way the head's search chooses, since the pipeline's signed power and StandardScaler act per dimension
(a part counts in proportion to its width; the "l2" norm option instead rescales the whole row). The
rows of every part must be the same (sample, view) in the same order — they are, when the parts were
read for one manifest with one views/tta/policy setting — and anything else is an error, never a
silent misalignment. Its cost is the sum of its parts' costs; its key is the hash of its parts' keys.
"""
from __future__ import annotations

import numpy as np

from extract.cache import FeatureSet
from study.hashing import spec_hash
from study.results import FUSED_PREFIX, fused_name, fused_parts  # noqa: F401 (the arms' shared names)

PREFIX = FUSED_PREFIX


def fuse(parts: dict[str, FeatureSet]) -> FeatureSet:
    """The concatenation of ``parts`` (backbone -> feature set), in the given order."""
    if len(parts) < 2:
        raise ValueError(f"a fused feature set needs at least two backbones, got {list(parts)}")
    names, sets = list(parts), list(parts.values())
    first = sets[0]
    for name, fs in zip(names[1:], sets[1:]):
        same = (np.array_equal(fs.sample_id, first.sample_id) and np.array_equal(fs.view, first.view)
                and np.array_equal(fs.labels, first.labels))
        if not same:
            raise ValueError(f"cannot fuse {name} with {names[0]}: their rows are not the same (sample, view) "
                             "pairs in the same order; read both for one manifest with the same extract settings")
    spec = {"fused": {n: fs.spec for n, fs in zip(names, sets)}, "tta": first.spec.get("tta", "none"),
            "views": first.spec.get("views"), "manifest_hash": first.spec.get("manifest_hash")}
    costs = [fs.extract_s for fs in sets]
    rows = [fs.row_cost_s for fs in sets]
    return FeatureSet(features=np.concatenate([fs.features for fs in sets], axis=1), labels=first.labels,
                      sample_id=first.sample_id, view=first.view, spec=spec,
                      key=spec_hash({"fused": [fs.key for fs in sets]}), path=first.path, split=first.split,
                      extract_s=None if any(c is None for c in costs) else float(sum(costs)),
                      row_cost_s=None if any(r is None for r in rows) else np.sum(rows, axis=0))
