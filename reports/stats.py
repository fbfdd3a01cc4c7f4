"""McNemar's exact test on top-1: a paired comparison of two models on the same test samples, kept beside the
report's primary test (the class-stratified paired bootstrap on mean per-class accuracy, ``reports.decision``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from study.protocol import correct


@dataclass(frozen=True)
class McNemar:
    n_common: int
    only_a: int   # samples A got right and B wrong
    only_b: int
    p_value: float


def correctness(row, ids: list[str], labels_by_id: dict[str, int]) -> np.ndarray:
    pred = dict(zip(row.test_sample_id, row.test_pred))
    return correct(ids, [pred[s] for s in ids], labels_by_id)[1].astype(bool)


def mcnemar(row_a, row_b, *, labels_by_id: dict[str, int]) -> McNemar:
    """Exact (binomial) McNemar test on the top-1 correctness of the test samples both rows predicted.

    Rows (``study.results.ResultRow``) carry ``test_sample_id`` and ``test_pred``; a pair with no common sample
    is an error rather than a p-value of 1, which would read as 'no difference'.
    """
    common = sorted(set(row_a.test_sample_id) & set(row_b.test_sample_id))
    if not common:
        raise ValueError(f"rows {row_a.method} and {row_b.method} share no test sample")
    ca, cb = correctness(row_a, common, labels_by_id), correctness(row_b, common, labels_by_id)
    only_a, only_b = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)
    return McNemar(n_common=len(common), only_a=only_a, only_b=only_b, p_value=p)
