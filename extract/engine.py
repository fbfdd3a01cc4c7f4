"""The extraction engine: manifest rows x views -> pooled pre-logits, streamed into the HDF5 cache.

DataLoader workers decode and transform while the model runs (pinned memory on CUDA);
the model runs channels-last under ``torch.inference_mode`` and autocast. Work is cut into fixed
global batches of ``batch_size`` rows; each finished batch is saved as its own part file
(``<cache_dir>/.<key>.parts/rows-<start>-<stop>.npy``) with an atomic rename, so a process killed
at any instant (``kill -9`` included) leaves only whole batches behind. A rerun skips the batches
that exist and runs the others with exactly the same batch composition, so the result is
bit-identical to an uninterrupted run. Under torchrun each rank takes every world_size-th batch,
and rank 0 merges all parts into ``<key>.h5`` after a barrier (written to a temporary name, then
``os.replace``): the same batches, hence the same bytes, as one process.

Precision ``auto``: bf16 autocast on CUDA (fp16 where bf16 is unsupported) and on CPUs with native
bf16 (oneDNN reports AVX-512 BF16 / AMX), else fp32. ``precision="fp32"`` turns it off.

Bit-identity (rerun, resume, sharded vs single process) holds for the same device and intra-op
thread count: CPU kernels sum in a thread-count-dependent order (differences ~1e-6). torchrun gives
each rank OMP_NUM_THREADS=1, so a sharded run equals a single process run with OMP_NUM_THREADS=1.
Batch size and thread count are not in the key (they are speed settings, not study choices);
a resumed run reuses part files only when they were made with the same batch size.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset.images import ImageLoadError, load_rgb
from dataset.manifest import manifest_hash, read_manifest
from dataset.transforms import TTA_VIEWS, augment_transform, eval_transform, make_view, policy_spec, tta_views
from extract.backbones import backbone_spec as make_backbone_spec
from extract.backbones import load_backbone
from extract.cache import CacheMismatch, cache_key, cache_path, cache_spec, check_cache, write_cache
from study import distributed
from study.atomic import atomic_path, write_text_atomic
from study.hashing import canonical_json, file_sha256

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ImageUnreadable(RuntimeError):
    """An image the manifest lists but extraction cannot use; names the sample."""


# ---------------------------------------------------------------- rows and views


@dataclass(frozen=True)
class RowPlan:
    """The cache's rows in order: view 0 of every manifest row, then its test-time views (the mirror,
    of every row), then views 1..K of the non-test rows."""
    manifest_row: np.ndarray
    view: np.ndarray
    sample_id: np.ndarray
    label: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.view)


def plan_rows(manifest, *, views: int, tta: str = "none") -> RowPlan:
    n = len(manifest)
    augmentable = np.flatnonzero(manifest["split"].to_numpy() != "test")
    groups = [(np.arange(n), 0)] + [(np.arange(n), v) for v in tta_views(tta)]
    groups += [(augmentable, v) for v in range(1, views + 1)]
    rows = np.concatenate([g for g, _ in groups]).astype(np.int64)
    view = np.concatenate([np.full(len(g), v, np.int64) for g, v in groups])
    return RowPlan(manifest_row=rows, view=view,
                   sample_id=manifest["sample_id"].to_numpy(dtype=str)[rows],
                   label=manifest["label"].to_numpy(dtype=np.int64)[rows],
                   split=manifest["split"].to_numpy(dtype=str)[rows])


class ViewDataset(Dataset):
    """Row i of a RowPlan as a normalised tensor; views >= 1 are reproducible per (seed, sample, view)."""

    def __init__(self, *, plan: RowPlan, paths: list[Path], sha256: list[str], data_config: dict,
                 policy: str, seed: int):
        self.plan, self.paths, self.sha256, self.seed = plan, paths, sha256, seed
        self.clean = eval_transform(data_config)
        self.augment = augment_transform(data_config, policy)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        m, view, sample_id = int(self.plan.manifest_row[i]), int(self.plan.view[i]), str(self.plan.sample_id[i])
        img = self._load(m, sample_id)
        return make_view(img, clean=self.clean, augment=self.augment, seed=self.seed, sample_id=sample_id,
                         view=view), i

    def _load(self, m: int, sample_id: str):
        path = self.paths[m]
        try:
            img = load_rgb(path)
        except ImageLoadError as exc:
            raise ImageUnreadable(f"sample {sample_id!r} ({path}) cannot be read: {exc.reason} {exc.detail}. "
                                  "The manifest lists it as usable: rebuild the dataset (--stages dataset) "
                                  "so it is excluded, or restore the file") from exc
        if self.sha256[m] and file_sha256(path) != self.sha256[m]:
            raise ImageUnreadable(f"sample {sample_id!r} ({path}) changed since the manifest was built "
                                  "(sha256 differs); rebuild the dataset (--stages dataset)")
        return img


# ---------------------------------------------------------------- precision and device


def resolve_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; allowed: {PRECISIONS}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return "fp32"


class FeatureRunner:
    """The model on its device, channels-last, under inference_mode and autocast: images -> float32 features."""

    def __init__(self, model: torch.nn.Module, *, device: str, precision: str, channels_last: bool):
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.precision = precision

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPE.get(self.precision),
                                                    enabled=self.precision != "fp32"):
            out = self.model(x)
        return out.float().cpu().numpy()


# ---------------------------------------------------------------- part files (resume + sharding)


def parts_dir(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f".{key}.parts"


def _part_path(parts: Path, start: int, stop: int) -> Path:
    return parts / f"rows-{start:09d}-{stop:09d}.npy"


def batch_bounds(n_rows: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n_rows)) for s in range(0, n_rows, batch_size)]


def done_batches(parts: Path, bounds: list[tuple[int, int]]) -> set[int]:
    return {b for b, (s, e) in enumerate(bounds) if _part_path(parts, s, e).is_file()}


def _prepare_parts(parts: Path, spec: dict, batch_size: int) -> None:
    """Create (or check) the parts folder; parts from another spec or batch size are never mixed in."""
    marker = parts / "spec.json"
    text = canonical_json({"spec": spec, "batch_size": batch_size})
    if marker.is_file() and marker.read_text() != text:
        log.warning("discarding partial extraction in %s: made with another spec or batch size", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_text_atomic(marker, text)


def _save_part(parts: Path, start: int, feats: np.ndarray) -> None:
    with atomic_path(_part_path(parts, start, start + len(feats))) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, feats)
            f.flush()


def _part_blocks(parts: Path, bounds: list[tuple[int, int]], feature_dim: int):
    for s, e in bounds:
        block = np.load(_part_path(parts, s, e))
        if block.shape != (e - s, feature_dim) or block.dtype != np.float32:
            raise RuntimeError(f"part file {_part_path(parts, s, e)} has {block.shape} {block.dtype}, expected "
                               f"({e - s}, {feature_dim}) float32; delete {parts} and rerun")
        yield s, block


# ---------------------------------------------------------------- the public entry point


@dataclass(frozen=True)
class Extraction:
    """What an extraction is: the manifest, its rows, the spec and the key."""
    manifest: object
    plan: RowPlan
    spec: dict
    key: str
    path: Path


def plan_extraction(*, manifest_path, backbone: str, cache_dir, views: int, policy: str, seed: int, tta: str = "none",
                    device: str = "cpu", precision: str = "auto", storage_dtype: str = "float32",
                    weights_file: str | None = None, channels_last: bool = True,
                    pretrained: bool = True) -> Extraction:
    """Everything about an extraction that needs no model: rows, spec, key, cache path."""
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    if storage_dtype not in ("float32", "float16"):
        raise ValueError(f"storage_dtype {storage_dtype!r}; allowed: float32, float16")
    manifest = read_manifest(manifest_path)
    spec = cache_spec(
        backbone_spec=make_backbone_spec(backbone, weights_file=weights_file, pretrained=pretrained),
        views=views, tta=tta, policy_spec=policy_spec(policy), seed=seed, manifest_hash=manifest_hash(manifest),
        storage_dtype=storage_dtype, precision=resolve_precision(precision, device), channels_last=channels_last)
    key = cache_key(spec)
    return Extraction(manifest=manifest, plan=plan_rows(manifest, views=views, tta=tta), spec=spec, key=key,
                      path=cache_path(cache_dir, key))


def extract_features(*, manifest_path, backbone: str, cache_dir, views: int, policy: str, seed: int, tta: str = "none",
                     device: str = "cpu", batch_size: int = 64, num_workers: int = 2, precision: str = "auto",
                     storage_dtype: str = "float32", weights_file: str | None = None, rebuild: bool = False,
                     data_root=None, channels_last: bool = True, pretrained: bool = True,
                     progress: bool = True) -> Path:
    """Extract (or reuse) the feature cache for ``backbone`` on the manifest; return the ``.h5`` path.

    A valid cache is returned without loading the model. A cache that fails validation is an error
    naming what differs, unless ``rebuild`` (``--rebuild-cache``). ``data_root`` is the folder the
    manifest's relative paths start from (default: ``../shared/datasets`` beside the repo).
    Under torchrun (study.distributed initialised) every rank must call this with the same arguments.
    """
    device = distributed.device_for_rank(device)
    job = plan_extraction(manifest_path=manifest_path, backbone=backbone, cache_dir=cache_dir, views=views,
                          policy=policy, seed=seed, tta=tta, device=device, precision=precision,
                          storage_dtype=storage_dtype, weights_file=weights_file, channels_last=channels_last,
                          pretrained=pretrained)
    parts = parts_dir(cache_dir, job.key)
    if rebuild and distributed.is_main():
        job.path.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    distributed.barrier()
    if job.path.is_file():
        _validate(job)
        log.info("feature cache hit: %s (%s)", job.path, backbone)
        return job.path
    bounds = batch_bounds(len(job.plan), batch_size)
    if distributed.is_main():
        _prepare_parts(parts, job.spec, batch_size)
    distributed.barrier()
    feature_dim = _run_batches(job, parts=parts, bounds=bounds, data_root=data_root, device=device,
                               num_workers=num_workers, progress=progress, weights_file=weights_file,
                               pretrained=pretrained)
    feature_dim = _agree_on_dim(feature_dim)
    distributed.barrier()
    if distributed.is_main():
        _merge(job, parts=parts, bounds=bounds, feature_dim=feature_dim)
    distributed.barrier()
    return job.path


def _validate(job: Extraction) -> None:
    check_cache(job.path, expected_spec=job.spec, expected_sample_id=job.plan.sample_id,
                expected_view=job.plan.view)


def _image_paths(manifest, data_root) -> list[Path]:
    from study.config import REPO_ROOT

    root = Path(data_root) if data_root is not None else REPO_ROOT.parent / "shared" / "datasets"
    return [Path(p) if Path(p).is_absolute() else root / p for p in manifest["path"]]


def _my_batches(bounds: list[tuple[int, int]], done: set[int]) -> list[int]:
    world, rank = distributed.world_size(), distributed.rank()
    return [b for b in range(len(bounds)) if b % world == rank and b not in done]


def _run_batches(job: Extraction, *, parts: Path, bounds, data_root, device: str, num_workers: int,
                 progress: bool, weights_file, pretrained: bool) -> int | None:
    """Extract this rank's missing batches into part files; return the feature dim (None if nothing ran)."""
    todo = _my_batches(bounds, done_batches(parts, bounds))
    if not todo:
        return None
    bb = load_backbone(job.spec["backbone"]["name"], weights_file=weights_file, pretrained=pretrained)
    runner = FeatureRunner(bb.model, device=device, precision=job.spec["precision"],
                           channels_last=job.spec["channels_last"])
    dataset = ViewDataset(plan=job.plan, paths=_image_paths(job.manifest, data_root),
                          sha256=list(job.manifest["sha256"]), data_config=bb.data_config,
                          policy=job.spec["policy"]["name"], seed=job.spec["seed"])
    loader = DataLoader(dataset, batch_sampler=[list(range(*bounds[b])) for b in todo], num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda", persistent_workers=False)
    n_todo = sum(bounds[b][1] - bounds[b][0] for b in todo)
    t0 = time.perf_counter()
    with tqdm(total=n_todo, unit="img", desc=f"extract {bb.name}", disable=not progress,
              position=distributed.rank(), dynamic_ncols=True) as bar:
        for images, rows in loader:
            _save_part(parts, int(rows[0]), runner(images))
            bar.update(len(rows))
    elapsed = time.perf_counter() - t0
    _add_elapsed(parts, elapsed)
    log.info("extracted %d rows of %s in %.1fs (rank %d)", n_todo, bb.name, elapsed, distributed.rank())
    return bb.feature_dim


def _elapsed_path(parts: Path, rank: int) -> Path:
    return parts / f"elapsed.rank{rank}.json"


def _add_elapsed(parts: Path, seconds: float) -> None:
    """Accumulate this rank's extraction wall time across resumed runs (the cost the report shows)."""
    path = _elapsed_path(parts, distributed.rank())
    total = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    write_text_atomic(path, json.dumps({"seconds": total + seconds}))


def _extract_seconds(parts: Path) -> float | None:
    """Wall time of the extraction: the slowest rank's total (ranks run in parallel)."""
    totals = [json.loads(p.read_text())["seconds"] for p in parts.glob("elapsed.rank*.json")]
    return max(totals) if totals else None


def _agree_on_dim(feature_dim: int | None) -> int | None:
    """Every rank's feature dim (a rank with no batches left has none); the merge needs one."""
    if distributed.world_size() == 1:
        return feature_dim
    import torch.distributed as dist

    dims = [None] * distributed.world_size()
    dist.all_gather_object(dims, feature_dim)
    return next((d for d in dims if d is not None), None)


def _merge(job: Extraction, *, parts: Path, bounds, feature_dim: int | None) -> None:
    missing = sorted(set(range(len(bounds))) - done_batches(parts, bounds))
    if missing:
        raise RuntimeError(f"{len(missing)} batches of {job.path.name} are missing from {parts} after extraction "
                           f"(first rows {bounds[missing[0]]}); rerun to complete them")
    if feature_dim is None:  # every batch was already on disk (a resumed run killed during the merge)
        feature_dim = int(np.load(_part_path(parts, *bounds[0]), mmap_mode="r").shape[1]) if bounds else 0
    with atomic_path(job.path) as tmp:
        write_cache(tmp, spec=job.spec, n_rows=len(job.plan), feature_dim=feature_dim, labels=job.plan.label,
                    sample_id=job.plan.sample_id, view=job.plan.view, split=job.plan.split,
                    feature_blocks=_part_blocks(parts, bounds, feature_dim), extract_s=_extract_seconds(parts))
    try:
        _validate(job)
    except CacheMismatch:
        job.path.unlink(missing_ok=True)
        raise
    shutil.rmtree(parts, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """CLI for one extraction (also the torchrun entry point: ``torchrun --nproc_per_node 2 -m extract.engine ...``)."""
    import argparse

    p = argparse.ArgumentParser(description="Extract (or reuse) one backbone's feature cache for a manifest.")
    p.add_argument("--manifest", required=True)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--policy", default="light")
    p.add_argument("--tta", default="none", choices=sorted(TTA_VIEWS), help="test-time views of every image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--storage-dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--weights", default=None, help="a local weights file")
    p.add_argument("--rebuild-cache", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    distributed.init_from_env()
    path = extract_features(manifest_path=args.manifest, backbone=args.backbone, cache_dir=args.cache_dir,
                            views=args.views, policy=args.policy, seed=args.seed, tta=args.tta, device=args.device,
                            batch_size=args.batch_size, num_workers=args.num_workers, precision=args.precision,
                            storage_dtype=args.storage_dtype, weights_file=args.weights, rebuild=args.rebuild_cache,
                            data_root=args.data_root, progress=not args.no_progress)
    if distributed.is_main():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
