"""The one reader of the activation store: rows by (image sha256, view name) key, as a NumPy array or a torch
tensor, with their content identity and their compute costs.

Every consumer reads through an ``EntryReader``: the heads' feature sets (``extract.cache``), the ``stages``
set (``classify.stacked``) and the fine-tunes' inputs (``finetune.inputs``). It indexes its entry once;
identity and cost need no row bytes, so a consumer can key its work by them before it reads anything.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from extract.store import Index, Store


class EntryReader:
    """Reads rows of one store entry (see the module docstring); every row read is checksummed."""

    def __init__(self, store: Store):
        self.store = store
        self._index: Index | None = None

    @property
    def index(self) -> Index:
        if self._index is None:
            self._index = self.store.index()
        return self._index

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype(self.store.spec["storage_dtype"])

    def identity(self, keys) -> str:
        """The content identity of ``keys``' rows in this order (the store entry and the rows' digests)."""
        return self.store.identity(keys, self.index)

    def costs(self, keys) -> np.ndarray:
        """Compute seconds of each of ``keys``: its share of the pass that made it (a repeated key is free)."""
        self.store.require(keys, self.index)
        return self.index.row_costs(keys)

    def array(self, keys, *, dtype=np.float32) -> np.ndarray:
        """The rows of ``keys``, (N, ...) as ``dtype`` (None: the entry's storage dtype)."""
        return self.store.read(keys, self.index, dtype=self.storage_dtype if dtype is None else dtype)

    def chunks(self, keys, *, max_bytes: int) -> Iterator[np.ndarray]:
        """The rows of ``keys`` at the storage dtype, at most ``max_bytes`` (and one row) at a time, in order."""
        if not keys:
            return
        step = max(1, max_bytes // max(1, self.array(keys[:1], dtype=None)[0].nbytes))
        for start in range(0, len(keys), step):
            yield self.array(keys[start:start + step], dtype=None)

    def tensor(self, keys, *, n_views: int) -> torch.Tensor:
        """(N, ``n_views``, ...) at the entry's own dtype (float16 halves a fine-tune's memory; a float32 entry
        keeps what it stored) from image-major ``keys`` (each image's ``n_views`` views together)."""
        acts = self.array(keys, dtype=None)
        return torch.from_numpy(acts.reshape(len(keys) // n_views, n_views, *acts.shape[1:]))
