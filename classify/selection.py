"""A head's rows, split by split: what it fits on, what scores it on val, and clean test, each in its own field.

The head arm's search (classify/search.py) fits every trial on ``HeadData.train`` and scores it on ``val``, refits
the chosen trial on ``train`` + ``val_fit``, and only then predicts ``test``, once. The few-shot curve
(classify/fewshot.py) ``refit``s the chosen head on a draw of the same fitting rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from classify.heads import make_pipeline


@dataclass(frozen=True)
class Rows:
    """Feature rows of one split (or a union of splits), with labels and sample ids."""
    X: np.ndarray
    y: np.ndarray
    sample_id: np.ndarray

    def __post_init__(self):
        if not (len(self.X) == len(self.y) == len(self.sample_id)):
            raise ValueError(f"Rows: {len(self.X)} feature rows, {len(self.y)} labels, {len(self.sample_id)} ids")

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index) -> "Rows":
        return Rows(self.X[index], self.y[index], self.sample_id[index])


def concat(*parts: Rows) -> Rows:
    return Rows(np.concatenate([p.X for p in parts]), np.concatenate([p.y for p in parts]),
                np.concatenate([p.sample_id for p in parts]))


@dataclass(frozen=True)
class HeadData:
    """What one head needs: rows to fit during selection, clean val rows to score it, the val rows
    added for the refit (clean, or clean + augmented views), and clean test rows."""
    train: Rows
    val: Rows
    val_fit: Rows
    test: Rows


def refit(method: str, point: dict, *, rows: Rows, seed: int, head_cfg: dict):
    """The chosen pipeline, fitted from scratch on ``rows`` (train + val)."""
    return make_pipeline(method, point, seed=seed, head_cfg=head_cfg, n_rows=len(rows)).fit(rows.X, rows.y)
