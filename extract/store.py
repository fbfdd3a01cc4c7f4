"""The per-image activation store: rows keyed by (image content, view), files keyed by what changes their numbers.

An *entry* is one backbone spec x one layer (the pooled pre-logits, or the activations at a fine-tune
cut) x precision x storage dtype x library versions. Its key is the sha256 of the canonical JSON of
that spec; nothing about a split, a label, a class set or a manifest is in it, so a new split seed
or class set reads the rows earlier runs computed and computes only the rest. Layout::

    <store>/<key>/spec.json          the spec (its sha256 is the folder name; checked on open)
    <store>/<key>/seg-<id>.h5         immutable segments, each written whole then renamed into place
    <store>/<key>/.lock               one writer at a time (study.atomic.file_lock)
    <store>/<key>/.readers            readers hold it shared; removing files (--rebuild-cache, extract.list
                                      --prune) holds it exclusive, so no reader takes a file being replaced
                                      for a damaged one

A segment holds ``data`` (n, *shape) in the storage dtype, ``sha256`` (the image's content hash),
``view`` (e.g. ``clean``, ``hflip``, ``aug:light:1a2b3c4d:s0:2``) and ``digest`` (blake2b of the row's
bytes), all chunked with HDF5's fletcher32 checksums, so a damaged chunk fails on read instead of
giving wrong numbers; the row digests are checked again when rows are read and make up the content
identity (``identity``) that downstream artefacts are keyed by. A segment is fsync'ed before its
rename: a row counts as stored only once its bytes are on disk, and a process killed at any instant
leaves whole segments only (the rows of the segment being written are computed again).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from study.atomic import file_lock, write_bytes_atomic
from study.errors import StudyError
from study.hashing import canonical_json, spec_differences, spec_hash

FORMAT_VERSION = 2
STORAGE_DTYPES = ("float32", "float16")
READERS_LOCK = ".readers"
READ_BYTES = 4 << 20  # a read takes at most this much of a segment at a time (at least one chunk)
log = logging.getLogger(__name__)


class StoreDamaged(StudyError):
    """A store file whose bytes fail their checksums or whose spec does not hash to its key."""


class StoreMissingRows(StudyError):
    """Rows a consumer asked for that the store does not hold."""


class StoreReplaced(StudyError):
    """A segment this reader indexed was removed since: another process rebuilt or pruned the entry."""


@contextlib.contextmanager
def reading(entry_dir: Path, label: str = ""):
    """Shared hold of an entry's ``.readers`` lock while reading it: waits (and says so) while another process
    removes its files. An entry that is absent or in a folder this process cannot write is read without it."""
    entry_dir = Path(entry_dir)
    with contextlib.ExitStack() as stack:
        if entry_dir.is_dir():
            with contextlib.suppress(OSError, StudyError):  # a read-only store: nobody replaces its files either
                stack.enter_context(file_lock(
                    entry_dir / READERS_LOCK, shared=True,
                    waiting=f"waiting: another process is rebuilding or pruning the store entry "
                            f"{label or entry_dir.name} (--rebuild-cache or extract.list --prune); reading it once "
                            "that is done"))
        yield


def replacing(entry_dir: Path):
    """Exclusive hold of an entry's ``.readers`` lock while its files are removed (no reader is mid-read)."""
    return file_lock(Path(entry_dir) / READERS_LOCK, what="reading the store entry, before removing its files")


def library_versions() -> dict:
    """Versions of the libraries whose numerics shape the activations."""
    import PIL
    import timm
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__}


def entry_spec(*, backbone_spec: dict, layer: dict, precision: str, storage_dtype: str, channels_last: bool,
               device: str = "cpu") -> dict:
    """Everything that changes the numbers of every row of an entry; its sha256 is the entry's key."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {storage_dtype!r}; allowed: {', '.join(STORAGE_DTYPES)}")
    return json.loads(canonical_json({
        "format": FORMAT_VERSION, "backbone": backbone_spec, "layer": layer, "precision": precision,
        # The device type: GPU kernels (cuDNN, TF32 convolutions) differ from CPU ones in the last bits.
        "device": device_type(device), "storage_dtype": storage_dtype, "channels_last": channels_last,
        "versions": library_versions()}))


def device_type(device: str) -> str:
    """"cuda:1" -> "cuda": the kernels, not the card, change the numbers."""
    return str(device).split(":")[0]


def view_name(view: int, *, policy: dict, view_seed: int) -> str:
    """The store's name of view id ``view`` (0 clean, -1 mirror, k >= 1 augmented view k of ``policy``)."""
    if view == 0:
        return "clean"
    if view == -1:
        return "hflip"
    if view < 0:
        raise ValueError(f"view {view}; allowed: 0, -1 (mirror) or >= 1 (augmented)")
    return f"aug:{policy['name']}:{spec_hash(policy)[:8]}:s{view_seed}:{view}"


def row_digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).hexdigest().encode()


@dataclass
class Index:
    """Where each stored (sha256, view) row lives: segment file, row, digest; and each segment's cost."""
    rows: dict[tuple[str, str], tuple[Path, int, bytes]] = field(default_factory=dict)
    seconds: dict[Path, float] = field(default_factory=dict)  # compute seconds of each segment
    sizes: dict[Path, int] = field(default_factory=dict)  # rows in each segment

    def missing(self, wanted) -> list[tuple[str, str]]:
        return [k for k in dict.fromkeys(wanted) if k not in self.rows]

    def row_costs(self, wanted) -> np.ndarray:
        """Compute seconds of each of ``wanted``: its share of the pass time of the segment holding it; a key
        asked for again (the same image content twice) costs nothing the second time."""
        seen: set = set()
        costs = np.zeros(len(wanted), np.float64)
        for i, key in enumerate(wanted):
            if key not in seen:
                seen.add(key)
                seg = self.rows[key][0]
                costs[i] = self.seconds[seg] / self.sizes[seg]
        return costs

    def cost_s(self, wanted) -> float:
        """Compute seconds of the distinct rows in ``wanted``."""
        return float(self.row_costs(wanted).sum())


class Store:
    """One entry of the store (see the module docstring)."""

    def __init__(self, root: str | Path, spec: dict):
        self.spec = json.loads(canonical_json(spec))
        self.key = spec_hash(self.spec)
        self.dir = Path(root) / self.key

    @classmethod
    def open(cls, entry_dir: str | Path) -> "Store":
        """The entry in ``entry_dir`` as its spec.json describes it (the folder name must be its hash)."""
        entry_dir = Path(entry_dir)
        try:
            with reading(entry_dir):
                spec = json.loads((entry_dir / "spec.json").read_text())
        except (OSError, ValueError) as exc:
            raise StoreDamaged(f"no readable store entry at {entry_dir} ({exc}); run the extract stage "
                               "(with --rebuild-cache if the folder is damaged)") from exc
        store = cls(entry_dir.parent, spec)
        if store.key != entry_dir.name:
            raise StoreDamaged(f"{entry_dir / 'spec.json'} hashes to {store.key}, not to its folder's name: the file "
                               "was altered; rerun with --rebuild-cache")
        return store

    @property
    def label(self) -> str:
        layer = self.spec["layer"]
        return f"{self.spec['backbone'].get('name')}/{layer['kind'] if layer['kind'] == 'pooled' else layer['name']}"

    # -------------------------------------------------------------- the folder and its spec

    def create(self) -> None:
        spec_path = self.dir / "spec.json"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not spec_path.is_file():
                write_bytes_atomic(spec_path, canonical_json(self.spec).encode())
        except OSError as exc:
            raise StudyError(f"cannot write the activation store entry {spec_path} ({exc.strerror or exc}); "
                             "free disk space or fix the folder's permissions, then rerun") from exc
        self.check_spec()

    def check_spec(self) -> None:
        path = self.dir / "spec.json"
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreDamaged(f"{path} is unreadable ({exc}); rerun with --rebuild-cache to rebuild this entry") \
                from exc
        if spec_hash(stored) != self.key:
            diffs = spec_differences(self.spec, stored, labels=("expected", "file has"))
            raise StoreDamaged(f"{path} does not hash to its folder's key {self.key}: the file was altered "
                               f"({'; '.join(diffs) or 'same fields, other bytes'}); rerun with --rebuild-cache")

    def remove(self) -> None:
        """Delete the entry's spec and segments (``--rebuild-cache``). The caller holds ``lock()``, so no
        writer is mid-segment, and this holds ``replacing``, so no reader is mid-read; the lock files stay,
        since other processes may be waiting on them."""
        if self.dir.is_dir():
            with replacing(self.dir):
                remove_files(self.dir)

    def lock(self):
        """One writer per entry: a second study on the same ``--out`` waits here, then finds the rows done."""
        return file_lock(self.dir / ".lock", what=f"writing the store entry {self.label}")

    def wait_for_writer(self) -> bool:
        """Wait while another process writes this entry (it holds ``lock()``); True when one was writing."""
        if not (self.dir / ".lock").is_file():
            return False
        with file_lock(self.dir / ".lock", shared=True,
                       waiting=f"waiting: another process is writing the store entry {self.label}; reading the rows "
                               "it computes once it is done") as waited:
            return waited

    def clean_temporaries(self) -> int:
        """Remove segment files a killed writer left half-written (call under ``lock()``: no writer is mid-write)."""
        stale = list(self.dir.glob(".*.tmp"))
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    # -------------------------------------------------------------- reading

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.h5"))

    def index(self) -> Index:
        """The (sha256, view) -> row map over every segment, its id columns verified by their checksums."""
        idx = Index()
        with reading(self.dir, self.label):
            for seg in self.segments():
                with self._open(seg) as f:
                    sha, view, digest = (self._column(seg, f, name) for name in ("sha256", "view", "digest"))
                    idx.seconds[seg] = float(f.attrs.get("compute_s", 0.0))
                    idx.sizes[seg] = len(sha)
                for i, key in enumerate(zip(sha.astype(str), view.astype(str))):
                    idx.rows.setdefault(key, (seg, i, digest[i]))
        return idx

    def identity(self, wanted, index: Index | None = None) -> str:
        """The content identity of ``wanted`` rows, in order: equal only for the same bytes of the same rows."""
        index = index or self.index()
        self.require(wanted, index)
        h = hashlib.sha256(self.key.encode())
        for key in wanted:
            h.update(f"{key[0]}|{key[1]}|".encode() + index.rows[key][2])
        return h.hexdigest()

    def require(self, wanted, index: Index) -> None:
        missing = index.missing(wanted)
        if missing:
            raise StoreMissingRows(f"the activation store {self.dir} ({self.label}) lacks {len(missing)} of the "
                                   f"{len(wanted)} rows asked for (first: image {missing[0][0][:12]}..., view "
                                   f"{missing[0][1]}); run the extract stage to compute them")

    def read(self, wanted, index: Index | None = None, *, dtype=np.float32) -> np.ndarray:
        """The rows ``wanted`` ((sha256, view) pairs) in that order, as ``dtype``, checksums and digests verified.

        Streams: each segment's wanted rows are read a few chunks at a time (``READ_BYTES``), and chunks that
        hold no wanted row are never read, so memory beyond the result stays bounded whatever the entry's size."""
        index = index or self.index()
        self.require(wanted, index)
        by_seg: dict[Path, list[tuple[int, int]]] = {}
        for pos, key in enumerate(wanted):
            seg, row, _ = index.rows[key]
            by_seg.setdefault(seg, []).append((row, pos))
        out = None
        with reading(self.dir, self.label):
            for seg, pairs in by_seg.items():
                pairs.sort()
                with self._open(seg) as f:
                    out = self._read_segment(seg, f, pairs=pairs, out=out, n=len(wanted), dtype=dtype,
                                             digests=[index.rows[wanted[pos]][2] for _, pos in pairs])
        if out is None:
            return np.empty((0,), dtype)
        return out

    def _read_segment(self, seg: Path, f: h5py.File, *, pairs: list[tuple[int, int]], out: np.ndarray | None,
                      n: int, dtype, digests: list[bytes]) -> np.ndarray:
        """Rows ``pairs`` ((row, position in the result), sorted) of one open segment into ``out``."""
        rows = np.array([r for r, _ in pairs], dtype=np.int64)
        data = self._dataset(seg, f, "data")
        if out is None:
            out = np.empty((n, *data.shape[1:]), dtype)
        for lo, hi in _spans(rows, chunk_rows=(data.chunks or data.shape)[0], row_bytes=_row_bytes(data),
                             n=data.shape[0]):
            block = self._slice(seg, data, lo=lo, hi=hi)
            first, last = np.searchsorted(rows, [lo, hi])
            for (r, pos), digest in zip(pairs[first:last], digests[first:last]):
                self._check_row(seg, r, row=block[r - lo], digest=digest)
                out[pos] = block[r - lo]
        return out

    @staticmethod
    def _check_row(seg: Path, r: int, *, row: np.ndarray, digest: bytes) -> None:
        if row_digest(row) != digest:
            raise StoreDamaged(f"{seg}: row {r} does not match its digest (the file was altered); "
                               "rerun with --rebuild-cache")

    def _open(self, seg: Path):
        try:
            return h5py.File(seg, "r")
        except OSError as exc:
            if not seg.exists():  # not damaged: gone since it was indexed
                raise StoreReplaced(f"store segment {seg} was removed after this process indexed {self.label}: "
                                    "another process rebuilt or pruned the entry") from exc
            raise StoreDamaged(f"store segment {seg} is not a readable HDF5 file ({exc}); "
                               "rerun with --rebuild-cache") from exc

    def _dataset(self, seg: Path, f: h5py.File, name: str) -> h5py.Dataset:
        try:
            entry = f.attrs.get("entry")
            data = f[name]
        except (OSError, KeyError) as exc:
            raise _damaged(seg, name, exc) from exc
        if entry != self.key:
            raise StoreDamaged(f"store segment {seg} belongs to entry {entry}, not {self.key}; "
                               "rerun with --rebuild-cache")
        return data

    def _column(self, seg: Path, f: h5py.File, name: str) -> np.ndarray:
        return self._slice(seg, self._dataset(seg, f, name), lo=None, hi=None)

    @staticmethod
    def _slice(seg: Path, data: h5py.Dataset, *, lo: int | None, hi: int | None) -> np.ndarray:
        try:
            return data[lo:hi]
        except OSError as exc:  # h5py reports a fletcher32 mismatch as an OSError
            raise _damaged(seg, data.name.lstrip("/"), exc) from exc

    # -------------------------------------------------------------- writing

    def write_segment(self, keys: list[tuple[str, str]], data: np.ndarray, *, compute_s: float,
                      timings: dict | None = None) -> Path | None:
        """Store rows ``keys`` with ``data`` (float32) as one new segment; durable before it is visible.
        ``timings`` (optional) adds the seconds spent on row digests ("digest") and the rest ("write")."""
        if not keys:
            return None
        t0 = time.perf_counter()
        stored = np.ascontiguousarray(data, dtype=self.spec["storage_dtype"])
        if not np.isfinite(stored).all():  # e.g. an activation beyond float16's 65504: never store inf
            bad = int(np.flatnonzero(~np.isfinite(stored.reshape(len(stored), -1)).all(axis=1))[0])
            raise StudyError(f"row {keys[bad]} of {self.label} is not finite as {self.spec['storage_dtype']} "
                             f"(largest |value| {float(np.abs(data[bad]).max()):.3g}); store it as float32: "
                             "extract.cut_dtype (cuts) or extract.storage_dtype (pooled) = \"float32\"")
        t1 = time.perf_counter()
        digests = np.array([row_digest(r) for r in stored], dtype="S32")
        t2 = time.perf_counter()
        seg_id = hashlib.sha256(b"".join(digests) + "".join(f"{s}|{v}" for s, v in keys).encode()).hexdigest()[:20]
        path = self.dir / f"seg-{seg_id}.h5"
        row_bytes = max(1, stored[0].nbytes)
        chunk = max(1, min(len(keys), (1 << 20) // row_bytes))
        try:
            # Built in memory, then written by plain file I/O: on a full disk HDF5 itself fails with a
            # RuntimeError, leaves its half-written file open and crashes the interpreter when it exits.
            image = io.BytesIO()
            with h5py.File(image, "w") as f:
                f.create_dataset("data", data=stored, chunks=(chunk, *stored.shape[1:]), fletcher32=True)
                for name, col, width in (("sha256", [k[0] for k in keys], 64), ("view", [k[1] for k in keys], 64)):
                    f.create_dataset(name, data=np.array(col, dtype=f"S{width}"), chunks=True, fletcher32=True)
                f.create_dataset("digest", data=digests, chunks=True, fletcher32=True)
                f.attrs.update({"entry": self.key, "compute_s": float(compute_s), "n_rows": len(keys),
                                "written": time.time()})
            write_bytes_atomic(path, image.getbuffer())
        except OSError as exc:
            raise StudyError(f"cannot write the activation store segment {path} ({exc.strerror or exc}); "
                             "free disk space or fix the folder's permissions, then rerun: rows already stored "
                             "are kept") from exc
        if timings is not None:
            timings["digest"] = timings.get("digest", 0.0) + t2 - t1
            timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t2 + t1 - t0
        return path


def remove_files(entry_dir: Path) -> None:
    """Everything in an entry's folder but its lock files (other processes may be waiting on them)."""
    import shutil

    for p in Path(entry_dir).iterdir():
        if p.name not in (".lock", READERS_LOCK):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _damaged(seg: Path, name: str, exc: Exception) -> StoreDamaged:
    return StoreDamaged(f"store segment {seg} is damaged ({name}: {exc}); rerun with --rebuild-cache "
                        "to recompute it")


def _row_bytes(data: h5py.Dataset) -> int:
    return max(1, int(np.prod(data.shape[1:])) * data.dtype.itemsize)


def _spans(rows: np.ndarray, *, chunk_rows: int, row_bytes: int, n: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges covering the sorted ``rows``: whole HDF5 chunks (a chunk is checksummed and
    decoded whole, so a partial one costs the same), runs of adjacent chunks merged up to ``READ_BYTES``.
    Chunks holding no wanted row are skipped. Slices, not h5py's fancy selection: that was ~30x slower
    on 700 of 1,400 rows of a real segment, while chunk-aligned slices match reading the whole column."""
    per_read = max(1, READ_BYTES // (chunk_rows * row_bytes))
    chunks = np.unique(rows // chunk_rows)
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(chunks) + 1):
        if i == len(chunks) or chunks[i] != chunks[i - 1] + 1 or i - start >= per_read:
            spans.append((int(chunks[start]) * chunk_rows, min(int(chunks[i - 1] + 1) * chunk_rows, n)))
            start = i
    return spans


def describe(entry_dir: Path) -> dict:
    """One line of the store listing: backbone, layer, rows by view kind, bytes per row and on disk."""
    info = {"key": entry_dir.name, "path": str(entry_dir)}
    try:
        spec = json.loads((entry_dir / "spec.json").read_text())
    except (OSError, ValueError) as exc:
        return {**info, "error": f"unreadable spec.json: {exc}"}
    layer = spec.get("layer", {})
    info.update(backbone=spec.get("backbone", {}).get("name"),
                layer=layer.get("kind") if layer.get("kind") == "pooled" else layer.get("name"),
                precision=spec.get("precision"), storage_dtype=spec.get("storage_dtype"))
    kinds: dict[str, int] = {}
    row_bytes, disk, problems = None, 0, []
    with reading(entry_dir):
        for seg in sorted(entry_dir.glob("seg-*.h5")):
            disk += seg.stat().st_size
            try:
                with h5py.File(seg, "r") as f:
                    for v in f["view"][:].astype(str):
                        kind = v.split(":")[0]
                        kinds[kind] = kinds.get(kind, 0) + 1
                    row_bytes = int(np.prod(f["data"].shape[1:])) * f["data"].dtype.itemsize
            except (OSError, KeyError) as exc:
                problems.append(f"{seg.name}: {exc}")
    info.update(rows=sum(kinds.values()), clean=kinds.get("clean", 0), hflip=kinds.get("hflip", 0),
                aug=kinds.get("aug", 0), bytes_per_row=row_bytes, disk_mb=round(disk / 2**20, 2))
    if problems:
        info["error"] = "; ".join(problems)
    return info
