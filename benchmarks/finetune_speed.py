#!/usr/bin/env python
"""Fine-tuning speed: the naive loop vs the frozen prefix's stored activations, same data, same epochs, same seed.

EfficientNet-Lite0 with ``last:1`` unfrozen: one unit of its block list, which for Lite0 is the last stage
``blocks[6]`` (one MBConv, 192 -> 320 channels at 7x7) *together with* ``conv_head`` + ``bn2`` (the 1x1
320 -> 1280 conv), then global pool and a new linear head. The frozen prefix is stem + ``blocks[0..5]``; its
output (192 x 7 x 7) is what the activation store holds at the ``last:1`` cut (``PassSettings.cut_dtype``:
float16 by default).

Naive: every step decodes, augments (fresh view per epoch) and runs the whole network. Cached: the store's
pass computes the cut once (clean view 0 + ``--views`` augmented views of each training image, clean
val/test and their mirrors), then every epoch runs only the suffix on one stored view per image. Epoch
seconds (mean over epochs) include the validation pass; the naive loader keeps its workers across epochs.
"cache build s" is the compute share of the stored rows the fine-tune read (the store's pass, which also
fills the pooled features; a fine-tune never makes a pass of its own).

The cached path runs twice, with the cut stored as float16 (the default) and as float32 (the dtype is part
of the store entry's key, so the two share one store root but not their rows); val and test mean per-class
accuracies are printed side by side.

    python benchmarks/finetune_speed.py [--data-root ../shared/datasets] [--classes 10] [--epochs 3]

Last line: key=value pairs incl. epoch_speedup= and val_gap_pts= (float16 cache minus naive, percentage
points), fp16_vs_fp32_val_pts= and fp16_vs_fp32_test_pts= (float16 minus float32 cut storage, points).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.images import probe  # noqa: E402
from dataset.manifest import read_manifest, write_manifest  # noqa: E402
from extract.backbones import load_backbone  # noqa: E402
from extract.engine import PassSettings, open_stores, plan_layers  # noqa: E402
from extract.store import describe  # noqa: E402
from finetune.experiment import StoreAccess, run_finetune  # noqa: E402
from finetune.inputs import load_prefix  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from study.hashing import file_sha256  # noqa: E402


def caltech_subset(*, data_root: Path, out: Path, n_classes: int, n_train: int, n_val: int, n_test: int) -> Path:
    """First ``n_classes`` object classes (sorted) with enough images; the first files of each, in name order."""
    caltech = data_root / "caltech101" / "101_ObjectCategories"
    need = n_train + n_val + n_test
    classes = [d for d in sorted(caltech.iterdir()) if d.is_dir() and d.name != "BACKGROUND_Google"
               and len(list(d.glob("*.jpg"))) >= need][:n_classes]
    rows = []
    for label, folder in enumerate(classes):
        splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
        for f, split in zip(sorted(folder.glob("*.jpg"))[:need], splits):
            _, info = probe(f)
            rows.append({"sample_id": f"caltech101/{folder.name}/{f.name}", "path": str(f.relative_to(data_root)),
                         "source": "caltech101", "label": label, "class_name": folder.name, "split": split,
                         "sha256": file_sha256(f), "width": info.width, "height": info.height, "mode": info.mode})
    path = out / "manifest.csv"
    write_manifest(pd.DataFrame(rows), path)
    return path


def timed_run(*, backbone, manifest: Path, data_root: Path, hp: dict, out: Path, use_cache: bool,
              store: StoreAccess) -> dict:
    (row,) = run_finetune(backbone=backbone, policy="last:1", manifest_path=manifest, data_root=data_root,
                          hp={**hp, "prefix_cache": use_cache}, seed=0, device="cpu", finetune_dir=out / "finetune",
                          store=store)
    curve = row["selection"]["curve"]
    return {"epoch_s": sum(h["epoch_s"] for h in curve) / len(curve), "build_s": row["prefix_cache_s"],
            "val": row["selection"]["best_score"], "test": row["metrics"]["mean_per_class"],
            "img_s": sum(h["img_per_s"] for h in curve) / len(curve)}


def cut_entry(store: StoreAccess):
    """The store entry of the ``last:1`` cut under ``store``'s settings (its key includes the cut dtype)."""
    layers = [layer for layer in plan_layers("efficientnet_lite0", ["last:1"]) if layer.name == "last:1"]
    return open_stores(backbone="efficientnet_lite0", layers=layers, store_root=store.root,
                       settings=store.settings)["last:1"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=15)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=2)
    args = p.parse_args()
    data_root = Path(args.data_root).resolve()
    hp = dict(load_config()["finetune"])
    # One recipe (no grid): this measures the speed of a path and the effect of the cut dtype, not a choice.
    hp.update(epochs=args.epochs, views=args.views, num_workers=args.num_workers, patience=args.epochs, n_boot=0,
              grid={})
    backbone = load_backbone("efficientnet_lite0")
    with tempfile.TemporaryDirectory(prefix="ft_speed_") as tmp:
        out = Path(tmp)
        manifest = caltech_subset(data_root=data_root, out=out, n_classes=args.classes, n_train=args.train_per_class,
                                  n_val=args.val_per_class, n_test=5)
        print(f"Caltech subset: {args.classes} classes x ({args.train_per_class} train, {args.val_per_class} val); "
              f"EfficientNet-Lite0 last:1 (blocks[6] + conv_head/bn2 train); {args.epochs} epochs each; "
              f"batch {hp['batch_size']}, {hp['optimizer']}, lr {hp['lr']} (x{hp['backbone_lr_mult']} trunk)",
              flush=True)
        stores = {dtype: StoreAccess(root=out / "store", view_seed=0, settings=PassSettings(
            precision=hp["precision"], cut_dtype=dtype, num_workers=args.num_workers))
            for dtype in ("float16", "float32")}
        runs = {"naive": timed_run(backbone=backbone, manifest=manifest, data_root=data_root, hp=hp, out=out / "n",
                                   use_cache=False, store=stores["float16"])}
        for dtype, store in stores.items():
            runs[f"cache {dtype}"] = timed_run(backbone=backbone, manifest=manifest, data_root=data_root, hp=hp,
                                               out=out / dtype, use_cache=True, store=store)
        # What each stored cut costs on disk, and the dtype the fine-tune's training actually reads it as.
        entries = {dtype: cut_entry(store) for dtype, store in stores.items()}
        disk = {dtype: describe(entry.dir) for dtype, entry in entries.items()}
        read_as = {dtype: str(load_prefix(entry, manifest=read_manifest(manifest), views=hp["views"], tta=hp["tta"],
                                          policy=hp["augment"], view_seed=0).splits["train"].acts.dtype)
                   for dtype, entry in entries.items()}
    naive, cached, fp32 = runs["naive"], runs["cache float16"], runs["cache float32"]
    print(f"{'path':<16}{'s/epoch':>10}{'train img/s':>13}{'cache build s':>15}{'val mean/class':>16}"
          f"{'test mean/class':>17}")
    for name, r in runs.items():
        print(f"{name:<16}{r['epoch_s']:>10.2f}{r['img_s']:>13.1f}{r['build_s']:>15.1f}{r['val']:>16.4f}"
              f"{r['test']:>17.4f}")
    for dtype, info in disk.items():
        print(f"cut store {dtype}: {info['rows']} rows, {info['bytes_per_row'] / 1024:.1f} KiB per row, "
              f"{info['disk_mb']:.1f} MiB on disk; the fine-tune reads it as {read_as[dtype].replace('torch.', '')}")
    if read_as["float16"] == read_as["float32"]:
        print(f"note: finetune.inputs.load_prefix hands both entries to training as "
              f"{read_as['float32'].replace('torch.', '')}, so the float32 entry adds no precision to what trains")
    speedup = naive["epoch_s"] / cached["epoch_s"]
    gap = 100 * (cached["val"] - naive["val"])
    print(f"naive_epoch_s={naive['epoch_s']:.3f} cache_epoch_s={cached['epoch_s']:.3f} "
          f"cache_build_s={cached['build_s']:.1f} epoch_speedup={speedup:.1f} naive_val={naive['val']:.4f} "
          f"cache_val={cached['val']:.4f} val_gap_pts={gap:.2f} epochs={args.epochs} classes={args.classes} "
          f"views={args.views} naive_test={naive['test']:.4f} cache_test={cached['test']:.4f} "
          f"fp32_epoch_s={fp32['epoch_s']:.3f} fp32_build_s={fp32['build_s']:.1f} fp32_val={fp32['val']:.4f} "
          f"fp32_test={fp32['test']:.4f} fp16_vs_fp32_val_pts={100 * (cached['val'] - fp32['val']):.2f} "
          f"fp16_vs_fp32_test_pts={100 * (cached['test'] - fp32['test']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
