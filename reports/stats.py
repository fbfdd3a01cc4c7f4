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


def correctness(row: dict, labels_by_id: dict[str, int]) -> dict[str, bool]:
    return {sid: int(pred) == labels_by_id[sid] for sid, pred in zip(row["test_sample_id"], row["test_pred"])}


def mcnemar(row_a: dict, row_b: dict, *, labels_by_id: dict[str, int]) -> McNemar:
    """Exact (binomial) McNemar test on the test samples both rows predicted.

    Rows must carry ``test_sample_id`` and ``test_pred``; a pair with no common sample is an error
    rather than a p-value of 1, which would read as 'no difference'.
    """
    a, b = correctness(row_a, labels_by_id), correctness(row_b, labels_by_id)
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"rows {row_a['method']} and {row_b['method']} share no test sample")
    ca = np.array([a[s] for s in common])
    cb = np.array([b[s] for s in common])
    only_a, only_b = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)
    return McNemar(n_common=len(common), only_a=only_a, only_b=only_b, p_value=p)
