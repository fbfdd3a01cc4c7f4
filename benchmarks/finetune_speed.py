#!/usr/bin/env python
"""Fine-tuning speed: the naive loop vs the frozen-prefix activation cache, same data, same epochs, same seed.

EfficientNet-Lite0 with ``last:1`` unfrozen: one unit of its block list, which for Lite0 is the last stage
``blocks[6]`` (one MBConv, 192 -> 320 channels at 7x7) *together with* ``conv_head`` + ``bn2`` (the 1x1
320 -> 1280 conv), then global pool and a new linear head. The frozen prefix is stem + ``blocks[0..5]``; its
output (192 x 7 x 7) is what the cache stores (float16).

Naive: every step decodes, augments (fresh view per epoch) and runs the whole network. Prefix cache:
computed once (clean view 0 + ``--views`` augmented views of each training image, clean val/test), then
every epoch runs only the suffix on one cached view per image. Epoch seconds (mean over epochs) include the
validation pass; the naive loader keeps its workers across epochs.

    python benchmarks/finetune_speed.py [--data-root ../shared/datasets] [--classes 10] [--epochs 3]

Last line: key=value pairs incl. epoch_speedup= and val_gap_pts= (cache minus naive, percentage points).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.images import probe  # noqa: E402
from dataset.manifest import write_manifest  # noqa: E402
from extract.backbones import load_backbone  # noqa: E402
from finetune.experiment import run_finetune  # noqa: E402
from study.config import load_config  # noqa: E402
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


def timed_run(*, backbone, manifest: Path, data_root: Path, hp: dict, out: Path, use_cache: bool) -> dict:
    (row,) = run_finetune(backbone=backbone, policy="last:1", manifest_path=manifest, data_root=data_root,
                          hp={**hp, "prefix_cache": use_cache}, seed=0, device="cpu", finetune_dir=out / "finetune",
                          prefix_dir=out / "prefix")
    curve = row["selection"]["curve"]
    return {"epoch_s": sum(h["epoch_s"] for h in curve) / len(curve), "build_s": row["prefix_cache_s"],
            "val": row["selection"]["best_score"], "test": row["metrics"]["mean_per_class"],
            "img_s": sum(h["img_per_s"] for h in curve) / len(curve)}


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
    hp = load_config()["finetune"]
    hp.update(epochs=args.epochs, views=args.views, num_workers=args.num_workers, patience=args.epochs, n_boot=0)
    backbone = load_backbone("efficientnet_lite0")
    with tempfile.TemporaryDirectory(prefix="ft_speed_") as tmp:
        out = Path(tmp)
        manifest = caltech_subset(data_root=data_root, out=out, n_classes=args.classes, n_train=args.train_per_class,
                                  n_val=args.val_per_class, n_test=5)
        print(f"Caltech subset: {args.classes} classes x ({args.train_per_class} train, {args.val_per_class} val); "
              f"EfficientNet-Lite0 last:1 (blocks[6] + conv_head/bn2 train); {args.epochs} epochs each; "
              f"batch {hp['batch_size']}, {hp['optimizer']}, lr {hp['lr']} (x{hp['backbone_lr_mult']} trunk)")
        naive = timed_run(backbone=backbone, manifest=manifest, data_root=data_root, hp=hp, out=out / "n",
                          use_cache=False)
        cached = timed_run(backbone=backbone, manifest=manifest, data_root=data_root, hp=hp, out=out / "c",
                           use_cache=True)
    print(f"{'path':<14}{'s/epoch':>10}{'train img/s':>13}{'cache build s':>15}{'val mean/class':>16}")
    for name, r in (("naive", naive), ("prefix cache", cached)):
        print(f"{name:<14}{r['epoch_s']:>10.2f}{r['img_s']:>13.1f}{r['build_s']:>15.1f}{r['val']:>16.4f}")
    speedup = naive["epoch_s"] / cached["epoch_s"]
    gap = 100 * (cached["val"] - naive["val"])
    print(f"naive_epoch_s={naive['epoch_s']:.3f} cache_epoch_s={cached['epoch_s']:.3f} "
          f"cache_build_s={cached['build_s']:.1f} epoch_speedup={speedup:.1f} naive_val={naive['val']:.4f} "
          f"cache_val={cached['val']:.4f} val_gap_pts={gap:.2f} epochs={args.epochs} classes={args.classes} "
          f"views={args.views}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
