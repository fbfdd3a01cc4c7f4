"""The shared pass: one forward per (image, view) fills every store entry the study reads.

A consumer (the heads' feature sets, each fine-tune cut) asks for (image, view) rows of a layer;
``ensure_rows`` works out, per layer, which of them the store lacks, and computes their union in one
pass: DataLoader workers decode and transform while the model runs channels-last under
``inference_mode`` and the one precision resolver's autocast; the backbone's units run in order, the
activations after each requested cut and the pooled pre-logits at the end are all taken from the same
forward. Rows go to the store in whole batches (segments, see ``extract.store``), so a process killed
at any instant resumes by computing exactly the batches it lost, with the same batch composition:
single-process reruns end bit-identical to an uninterrupted run. Under torchrun each rank computes every
world_size-th batch and writes its own segments; rank 0 holds the entries' locks for the group.

Views: 0 is the clean eval view, -1 its mirror (test-time augmentation), k >= 1 augmented view k of the
policy; an augmented view is seeded by (view seed, the image's sha256, k), so it is the same image in
whatever split, run or worker it is drawn.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset.tensors import ImageViews
from dataset.transforms import policy_spec
from dataset.views import study_requests
from extract.backbones import backbone_spec as make_backbone_spec
from extract.backbones import load_backbone
from extract.store import Store, entry_spec, view_name
from study import distributed
from study.console import bars_shown
from study.precision import PRECISIONS, autocast, resolve_precision  # noqa: F401 (PRECISIONS re-exported)

log = logging.getLogger(__name__)
SEGMENT_BYTES = 64 << 20  # a segment is flushed once any layer buffers this much...
SEGMENT_SECONDS = 60.0  # ...or this long after the last one: a kill loses at most about this much work


# ---------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """What a consumer reads: ``pooled`` pre-logits, or the activations after unit ``after`` (a cut)."""
    name: str  # "pooled" or a fine-tune policy such as "last:2"
    spec: dict
    unit: int | None  # index of the last prefix unit; None for pooled


def plan_layers(backbone: str, policies: list[str] = ()) -> list[Layer]:
    """``pooled`` plus the cut of every ``last:k`` policy (``head`` reads pooled; ``all`` trains from images)."""
    from extract.blocks import block_list, parse_policy

    layers = [Layer("pooled", {"kind": "pooled", "name": "pooled"}, None)]
    cuts = [p for p in policies if parse_policy(p).last not in (None, 0)]
    if not cuts:
        return layers
    names = _unit_names(backbone, block_list)
    for k in dict.fromkeys(parse_policy(p).last for p in cuts):  # one cut per k: 'probe+last:k' reads last:k's
        if k >= len(names):
            continue  # every unit trains: the fine-tune reads images (finetune reports it)
        units = list(names[: len(names) - k])
        layers.append(Layer(f"last:{k}", {"kind": "cut", "name": f"after:{units[-1]}", "units": units},
                            len(units) - 1))
    return layers


@functools.lru_cache(maxsize=None)
def _unit_names(backbone: str, block_list) -> tuple[str, ...]:
    """The architecture's unit names: no weights needed (a random-init model has the same blocks), so a
    store hit never loads the pretrained model."""
    from extract import backbones

    model = backbones.load_backbone(backbone, pretrained=False).model
    return tuple(name for name, _ in block_list(model).units)


# ---------------------------------------------------------------- requests


def store_keys(manifest: pd.DataFrame, requests, *, policy: str, view_seed: int) -> list[tuple[str, str]]:
    """The store's (sha256, view name) key of each (manifest row, view) request."""
    spec, sha = policy_spec(policy), manifest["sha256"].tolist()
    return [(sha[m], view_name(v, policy=spec, view_seed=view_seed)) for m, v in requests]


# ---------------------------------------------------------------- the forward


class PassRunner:
    """The backbone's units in order under inference_mode + autocast; images -> {layer: float32 array}.

    Running the units one by one (the same units fine-tuning splits at) is what lets a cut's stored
    activations stand in for the frozen prefix exactly; the pooled output equals ``backbone.model(x)``.
    Architectures without a block list run ``model(x)`` and offer pooled features only.
    """

    def __init__(self, backbone, *, layers: list[Layer], device: str, precision: str, channels_last: bool,
                 prepare=None):
        from extract.blocks import block_list

        self.prepare = prepare  # applied to each batch on the device first (see _batch_to_float)
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = backbone.model.eval().to(self.device, memory_format=self.memory_format)
        self.precision, self.layers = precision, layers
        try:
            blocks = block_list(self.model)
            self.units, self.tail = [m for _, m in blocks.units], blocks.tail
        except ValueError:
            if any(layer.unit is not None for layer in layers):
                raise
            self.units, self.tail = None, None
        self.cuts = {layer.unit: layer.name for layer in layers if layer.unit is not None}

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        x = images.to(self.device, non_blocking=True)
        x = (x if self.prepare is None else self.prepare(x)).contiguous(memory_format=self.memory_format)
        out = {}
        with torch.inference_mode(), autocast(self.precision, str(self.device)):
            if self.units is None:
                out["pooled"] = _numpy(self.model(x))
                return out
            for i, unit in enumerate(self.units):
                x = unit(x)
                if i in self.cuts:
                    out[self.cuts[i]] = _numpy(x)
            out["pooled"] = _numpy(self.tail(x))
        return out


def _numpy(t: torch.Tensor) -> np.ndarray:
    # An array of its own in NCHW order: channels-last activations and tensors later ops reuse must not leak out.
    # A channels-last cut is copied once by .contiguous(); only an output already in NCHW needs the extra copy.
    out = t.float().contiguous().cpu()
    return out.numpy() if out.data_ptr() != t.data_ptr() else out.numpy().copy()


# ---------------------------------------------------------------- the pass


@dataclass
class PassResult:
    """The store entries of one backbone and what the pass did."""
    stores: dict[str, Store]  # layer name -> entry
    layers: list[Layer]
    computed: int = 0  # image-views computed (one forward each)
    stored: dict[str, int] = field(default_factory=dict)  # rows written per layer
    seconds: float = 0.0
    # Where the pass's seconds went (main thread: waiting for decoded images, the forward, buffering, waiting for
    # the segment writer; writer: row digests, building and writing segments) -- benchmarks/extract_throughput.py
    timings: dict[str, float] = field(default_factory=dict)


def decode_workers(setting: int | str, *, device: str) -> int:
    """extract.num_workers resolved: "auto" is 1 for a CPU forward (see extract/config.py), else up to 8."""
    if setting != "auto":
        return int(setting)
    if torch.device(device).type == "cpu":
        return 1
    # The cores this process may use (a container's or taskset's limit, not the host's), shared by the ranks on it.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_rank - 1))


@dataclass(frozen=True)
class PassSettings:
    """How to compute: device and speed settings (none of them changes which rows exist)."""
    device: str = "cpu"
    precision: str = "auto"
    storage_dtype: str = "float32"  # pooled features
    cut_dtype: str = "float16"  # fine-tune cut activations (large; see benchmarks/reuse.py for the effect)
    channels_last: bool = True
    batch_size: int = 64
    num_workers: int = 1  # decode_workers("auto", device="cpu")
    progress: bool = True
    segment_rows: int = 0  # > 0: write a segment every this many rows (tests); 0: by size and time
    overlap_writes: bool = True  # digest and write a segment in a thread while the next batches run forward
    float_in_batches: bool = True  # workers hand over uint8 images, made float once per batch (_batch_to_float)


def open_stores(*, backbone: str, layers: list[Layer], store_root, settings: PassSettings,
                weights_file: str | None = None, pretrained: bool = True) -> dict[str, Store]:
    """The store entry of each layer (spec and key only: nothing is read or computed)."""
    bb_spec = make_backbone_spec(backbone, weights_file=weights_file, pretrained=pretrained)
    precision = resolve_precision(settings.precision, settings.device)
    return {layer.name: Store(store_root, entry_spec(
        backbone_spec=bb_spec, layer=layer.spec, precision=precision, channels_last=settings.channels_last,
        device=settings.device, storage_dtype=settings.storage_dtype if layer.unit is None else settings.cut_dtype))
        for layer in layers}


def ensure_rows(*, manifest: pd.DataFrame, backbone: str, requests: list[tuple[int, int]], store_root,
                policy: str, view_seed: int, policies: list[str] = (), settings: PassSettings = PassSettings(),
                weights_file: str | None = None, pretrained: bool = True, data_root=None,
                rebuild: bool = False) -> PassResult:
    """Make the store hold ``requests`` for pooled features and every cut of ``policies``; one pass computes
    what any layer lacks. A second process on the same store waits for the first and then finds the rows.
    Under torchrun every rank must call this with the same arguments."""
    settings = PassSettings(**{**settings.__dict__, "device": distributed.device_for_rank(settings.device)})
    layers = plan_layers(backbone, list(policies))
    stores = open_stores(backbone=backbone, layers=layers, store_root=store_root, settings=settings,
                         weights_file=weights_file, pretrained=pretrained)
    keys = store_keys(manifest, requests, policy=policy, view_seed=view_seed)
    result = PassResult(stores=stores, layers=layers)
    with _locked(stores.values(), rebuild=rebuild):
        # Rank 0 decides what is missing and tells the others: a rank that indexed after another rank's
        # first segment landed would otherwise cut the work into other batches.
        todo, missing = distributed.broadcast_object(_work(stores, requests, keys) if distributed.is_main() else None)
        if todo:
            _compute(result, todo=todo, missing=missing, keys=keys, requests=requests, manifest=manifest,
                     backbone=backbone, policy=policy, view_seed=view_seed, settings=settings,
                     weights_file=weights_file, pretrained=pretrained, data_root=data_root)
        distributed.barrier()
    return result


# Entries this process rebuilt (--rebuild-cache): a run rebuilds each once, however many stages and
# split seeds ask for it, and later callers add to the fresh entry instead of wiping it again.
_REBUILT: set[Path] = set()


@contextlib.contextmanager
def _locked(stores, *, rebuild: bool):
    """Rank 0 takes every entry's lock (sorted, so two studies never deadlock) for the whole group."""
    stores = sorted(stores, key=lambda s: s.key)
    with contextlib.ExitStack() as stack:
        if distributed.is_main():
            for store in stores:
                if not store.dir.is_dir():
                    _explain_new_entry(store)
                stack.enter_context(store.lock())
                if rebuild and store.dir.resolve() not in _REBUILT:
                    store.remove()
                    _REBUILT.add(store.dir.resolve())
                store.create()
                if store.clean_temporaries():
                    log.info("removed segments a killed run left half-written in %s", store.dir)
        distributed.barrier()
        yield


def _explain_new_entry(store: Store) -> None:
    """Say why a new entry is started when one for the same backbone and layer exists: the differing fields."""
    from study.hashing import spec_differences

    for other in sorted(store.dir.parent.glob("*/spec.json")):
        try:
            spec = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        same_layer = spec.get("layer") == store.spec["layer"]
        if same_layer and spec.get("backbone", {}).get("name") == store.spec["backbone"]["name"]:
            diffs = spec_differences(store.spec, spec, labels=("now", "stored"))
            log.info("new store entry %s for %s: the stored entry %s differs in %s", store.key[:12], store.label,
                     other.parent.name[:12], "; ".join(diffs))


def _work(stores: dict[str, Store], requests, keys) -> tuple[list[int], dict[str, set]]:
    """Request positions to compute (first occurrence of each missing key) and each layer's missing keys."""
    missing = {name: set(store.index().missing(keys)) for name, store in stores.items()}
    union = set().union(*missing.values())
    seen, todo = set(), []
    for i, key in enumerate(keys):
        if key in union and key not in seen:
            seen.add(key)
            todo.append(i)
    return todo, missing


def _compute(result: PassResult, *, todo, missing, keys, requests, manifest, backbone, policy, view_seed, settings,
             weights_file, pretrained, data_root) -> None:
    batches = [todo[s:s + settings.batch_size] for s in range(0, len(todo), settings.batch_size)]
    mine = [b for i, b in enumerate(batches) if i % distributed.world_size() == distributed.rank()]
    if not mine:
        return
    bb = load_backbone(backbone, weights_file=weights_file, pretrained=pretrained)
    # One image per request, each with its one view: an item's index is its request's position.
    dataset = ImageViews.of_manifest(manifest.iloc[[m for m, _ in requests]], data_root=data_root,
                                     views=[[v] for _, v in requests], data_config=bb.data_config, policy=policy,
                                     seed=view_seed, verify=True)
    runner = PassRunner(bb, layers=result.layers, device=settings.device,
                        precision=resolve_precision(settings.precision, settings.device),
                        channels_last=settings.channels_last,
                        prepare=_batch_to_float(dataset) if settings.float_in_batches else None)
    loader = DataLoader(dataset, batch_sampler=mine, num_workers=settings.num_workers,
                        pin_memory=torch.device(settings.device).type == "cuda", persistent_workers=False)
    writer = _SegmentWriter(result.stores, missing, segment_rows=settings.segment_rows,
                            overlap=settings.overlap_writes)
    t0 = time.perf_counter()
    with tqdm(total=sum(map(len, mine)), unit="img", desc=f"extract {bb.name} ({len(result.layers)} layers)",
              disable=not (settings.progress and bars_shown()), position=distributed.rank(),
              dynamic_ncols=True) as bar:
        finished = False
        try:
            _run_batches(result, loader=loader, runner=runner, writer=writer, keys=keys, bar=bar)
            finished = True
        finally:  # the segment in flight is written whole (or its error raised) before the pass returns
            writer.close(flush=finished)
    result.stored = writer.stored
    result.seconds = time.perf_counter() - t0
    result.timings.update(writer.timings)
    log.info("%s: computed %d image-views in %.1fs (%.1f img/s); stored %s", backbone, result.computed,
             result.seconds, result.computed / max(result.seconds, 1e-9), writer.stored)


def _batch_to_float(dataset: ImageViews):
    """Take the last steps of the dataset's transforms (uint8 -> float, normalise) out of the workers and return
    them, to run once per batch: elementwise, so the same bits, but vectorised over the batch instead of four
    passes per image in a worker (on a 2-core CPU more of the decoding workers' time than decoding and
    resizing), and a quarter of the bytes to pass between processes. None when a transform ends otherwise."""
    from torchvision.transforms import v2

    composes = [dataset.clean, dataset.augment]
    tails = [c.transforms[-2:] for c in composes]
    if not all(len(t) == 2 and isinstance(t[0], v2.ToDtype) and isinstance(t[1], v2.Normalize) for t in tails) \
            or repr(tails[0]) != repr(tails[1]):
        return None
    dataset.clean, dataset.augment = (v2.Compose(c.transforms[:-2]) for c in composes)
    return v2.Compose(tails[0])


def _run_batches(result: PassResult, *, loader, runner: PassRunner, writer: "_SegmentWriter", keys, bar) -> None:
    """The loop: each decoded batch forward, its rows buffered for the writer; seconds of each part timed."""
    timings = result.timings
    for name in ("wait_data", "forward", "buffer"):
        timings.setdefault(name, 0.0)
    t = time.perf_counter()
    for images, index in loader:
        t1 = time.perf_counter()
        outputs = runner(images[:, 0])
        t2 = time.perf_counter()
        writer.add([keys[i] for i in index.tolist()], outputs)
        result.computed += len(index)
        bar.update(len(index))
        t3 = time.perf_counter()
        timings["wait_data"] += t1 - t
        timings["forward"] += t2 - t1
        timings["buffer"] += t3 - t2
        t = t3


class _SegmentWriter:
    """Buffers whole batches and writes them as one segment per layer (only the rows that layer lacks). With
    ``overlap``, a thread digests and writes a segment while the next batches run forward (the forward, the
    digests and numpy release the GIL); one segment at most is in flight, so memory stays bounded."""

    def __init__(self, stores: dict[str, Store], missing: dict[str, set], *, segment_rows: int = 0,
                 overlap: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.stores, self.missing, self.segment_rows = stores, missing, segment_rows
        self.keys: list = []
        self.data: dict[str, list[np.ndarray]] = {name: [] for name in stores}
        self.nbytes, self.since = 0, time.perf_counter()
        self.stored = {name: 0 for name in stores}
        self.timings = {"digest": 0.0, "write": 0.0, "wait_write": 0.0}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="segment-writer") if overlap else None
        self._pending = None

    def add(self, keys: list, outputs: dict[str, np.ndarray]) -> None:
        self.keys += keys
        for name in self.stores:
            self.data[name].append(outputs[name])
        self.nbytes += max(o.nbytes for o in outputs.values())
        if self.segment_rows:
            if len(self.keys) >= self.segment_rows:
                self.flush()
        elif self.nbytes >= SEGMENT_BYTES or time.perf_counter() - self.since >= SEGMENT_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        job = (self.keys, self.data, time.perf_counter() - self.since)
        self.keys, self.data = [], {name: [] for name in self.stores}
        self.nbytes, self.since = 0, time.perf_counter()
        self._wait()
        if self._pool is None:
            self._write(*job)
        else:
            self._pending = self._pool.submit(self._write, *job)

    def close(self, *, flush: bool) -> None:
        """Wait for the segment in flight, after writing what is buffered (``flush``; not after an error)."""
        try:
            if flush:
                self.flush()
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _wait(self) -> None:
        if self._pending is not None:
            t0 = time.perf_counter()
            pending, self._pending = self._pending, None
            pending.result()  # a write's error (a full disk) is raised here, in the pass
            self.timings["wait_write"] += time.perf_counter() - t0

    def _write(self, keys: list, data: dict[str, list[np.ndarray]], seconds: float) -> None:
        for name, store in self.stores.items():
            keep = [i for i, k in enumerate(keys) if k in self.missing[name]]
            if keep:
                rows = np.concatenate(data[name])
                rows = rows if len(keep) == len(keys) else rows[keep]
                store.write_segment([keys[i] for i in keep], rows, compute_s=seconds * len(keep) / len(keys),
                                    timings=self.timings)
                self.stored[name] += len(keep)


def _workers_arg(value: str) -> int | str:
    import argparse

    from extract.config import WORKERS_ALLOWED, is_workers

    setting = int(value) if value.isdigit() else value
    if is_workers(setting):
        return setting
    raise argparse.ArgumentTypeError(f"{value!r}; allowed: {WORKERS_ALLOWED}")


def main(argv: list[str] | None = None) -> int:
    """CLI for one backbone's pass over a manifest (also the torchrun entry: ``torchrun -m extract.engine``)."""
    import argparse

    from dataset.manifest import read_manifest
    from dataset.transforms import TTA_VIEWS

    p = argparse.ArgumentParser(description="Fill the activation store with one backbone's rows for a manifest.")
    p.add_argument("--manifest", required=True)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--store", required=True, help="the store folder (<out>/store)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--policy", default="light")
    p.add_argument("--policies", default="", help="fine-tune policies whose cuts to store, e.g. last:1,last:2")
    p.add_argument("--tta", default="none", choices=sorted(TTA_VIEWS), help="test-time views of every image")
    p.add_argument("--view-seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", default="auto", type=_workers_arg, help="decoding processes, or 'auto'")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--storage-dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--weights", default=None, help="a local weights file")
    p.add_argument("--rebuild-cache", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--segment-rows", type=int, default=0, help="write a segment every N rows (0: by size and time)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    distributed.init_from_env()
    manifest = read_manifest(args.manifest)
    settings = PassSettings(device=args.device, precision=args.precision, storage_dtype=args.storage_dtype,
                            batch_size=args.batch_size,
                            num_workers=decode_workers(args.num_workers, device=args.device),
                            progress=not args.no_progress,
                            segment_rows=args.segment_rows)
    result = ensure_rows(manifest=manifest, backbone=args.backbone, store_root=args.store, policy=args.policy,
                         requests=study_requests(manifest, views=args.views, tta=args.tta), view_seed=args.view_seed,
                         policies=[p for p in args.policies.split(",") if p], settings=settings,
                         weights_file=args.weights, data_root=args.data_root, rebuild=args.rebuild_cache)
    if distributed.is_main():
        for name, store in result.stores.items():
            print(f"{name}\t{store.dir}\tcomputed={result.computed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
