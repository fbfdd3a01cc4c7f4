"""The head arm's few-shot curve: per backbone, k images per class drawn from train, each (k, draw) searched anew.

A few-shot search is a head search (classify/search.py) whose training rows are the drawn images' rows (an
image brings its augmented views for ``aug``): its ``fewshot.trials`` trials choose method, feature set and
settings on the split's val, and the chosen one is refit on the draw alone and scored on test once. Draws
are seeded (seed, seed+1, ...) and drawn with ``study.protocol.draw_indices`` over the train images in manifest
order, exactly as the fine-tune arm draws them (finetune/fewshot.py), so at each (k, draw) both arms see the
same labelled images.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from classify.search import HeadSearch
from classify.selection import HeadData, Rows
from study.protocol import draw_indices, smallest_class


def draw_per_class(rows: Rows, *, k: int, seed: int) -> np.ndarray:
    """Indices of every row of ``k`` images of every class (an image's augmented views come with it)."""
    ids, first = np.unique(rows.sample_id, return_index=True)
    first = np.sort(first)  # images in the order they first appear: manifest order
    picked = rows.sample_id[first[draw_indices(rows.y[first], k=k, seed=seed)]]
    return np.flatnonzero(np.isin(rows.sample_id, picked))


def largest_k(search: HeadSearch) -> int:
    """The largest k every class's train images allow."""
    train = next(iter(search.data.values())).train
    _, first = np.unique(train.sample_id, return_index=True)
    return smallest_class(train.y[first])


def drawn(search: HeadSearch, *, k: int, draw: int) -> HeadSearch:
    """``search`` on ``k`` drawn train images per class (draw seed ``draw``), nothing added for its refit."""
    data = {}
    for name, d in search.data.items():
        train = d.train.take(draw_per_class(d.train, k=k, seed=draw))
        data[name] = HeadData(train=train, val=d.val, val_fit=d.val.take(np.arange(0)), test=d.test)
    return dataclasses.replace(search, data=data, fewshot=(k, draw))
