"""Paired comparisons of two models on the same test samples (McNemar's exact test)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class McNemar:
    n_common: int
    only_a: int   # samples A got right and B wrong
    only_b: int
    p_value: float


def correctness(row, ids: list[str], labels_by_id: dict[str, int]) -> np.ndarray:
    pred = dict(zip(row.test_sample_id, row.test_pred))
    unknown = [s for s in ids if s not in labels_by_id]
    if unknown:
        raise ValueError(f"test sample {unknown[0]!r} of {row.method} is not in the manifest: "
                         "the results and the manifest come from different datasets")
    return np.array([int(pred[s]) == labels_by_id[s] for s in ids])


def mcnemar(row_a, row_b, *, labels_by_id: dict[str, int]) -> McNemar:
    """Exact (binomial) McNemar test on the test samples both rows predicted.

    Rows (``study.results.ResultRow``) carry ``test_sample_id`` and ``test_pred``; a pair with no common sample is an error
    rather than a p-value of 1, which would read as 'no difference'.
    """
    common = sorted(set(row_a.test_sample_id) & set(row_b.test_sample_id))
    if not common:
        raise ValueError(f"rows {row_a.method} and {row_b.method} share no test sample")
    ca, cb = correctness(row_a, common, labels_by_id), correctness(row_b, common, labels_by_id)
    only_a, only_b = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)
    return McNemar(n_common=len(common), only_a=only_a, only_b=only_b, p_value=p)
