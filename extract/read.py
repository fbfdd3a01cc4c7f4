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

from extract.store import Index, Store, StoreMissingRows, StoreReplaced
from study.errors import StudyError


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
        return self._indexed(keys, lambda index: self.store.identity(keys, index))

    def costs(self, keys) -> np.ndarray:
        """Compute seconds of each of ``keys``: its share of the pass that made it (a repeated key is free)."""
        def costs(index: Index) -> np.ndarray:
            self.store.require(keys, index)
            return index.row_costs(keys)
        return self._indexed(keys, costs)

    def array(self, keys, *, dtype=np.float32) -> np.ndarray:
        """The rows of ``keys``, (N, ...) as ``dtype`` (None: the entry's storage dtype)."""
        dtype = self.storage_dtype if dtype is None else dtype
        return self._indexed(keys, lambda index: self.store.read(keys, index, dtype=dtype))

    def _indexed(self, keys, use):
        """``use(index)``, once more on a fresh index when another process changed the entry meanwhile: rows
        missing while it writes them (waited for), or segments it removed (--rebuild-cache, --prune) -- those
        rows must then hold the same bytes (digests) as before, or this reader would mix two contents."""
        try:
            return use(self.index)
        except StoreMissingRows:
            if not self.store.wait_for_writer():
                raise
            self._index = None
            return use(self.index)
        except StoreReplaced as exc:
            before = self.index
            self.store.wait_for_writer()  # a rebuild computes the rows again under the entry's lock
            self._index = None
            now = self.index.rows
            changed = [k for k in dict.fromkeys(keys)
                       if k in before.rows and k in now and now[k][2] != before.rows[k][2]]
            if changed:
                raise StudyError(f"{exc}, and it now holds other bytes for rows this process already used (first: "
                                 f"image {changed[0][0][:12]}..., view {changed[0][1]}); rerun this stage") from exc
            return use(self.index)

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
