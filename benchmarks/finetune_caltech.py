#!/usr/bin/env python
"""Caltech 101, standard protocol (102 classes, 30 training images per class of which 5 are val, rest test):
fine-tune EfficientNet-Lite0 with each candidate ``last:k`` through the prefix-activation cache, pick the
policy with the best val mean per-class accuracy, report its test figures.

    python benchmarks/finetune_caltech.py [--data-root ../shared/datasets] [--policies last:1,last:2]

The dataset comes from dataset.build.build_dataset with configs/caltech101.toml into out/bench/caltech101;
prefix caches and runs persist under out/bench/caltech101_finetune, so an interrupted benchmark resumes.
Quality bar of the recipe: ft_mean_per_class >= 0.93 (a frozen-feature LR head reaches about 0.92).
Last line: key=value pairs incl. ft_mean_per_class= (test, chosen policy) and ft_train_s=.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dataset.build import build_dataset  # noqa: E402
from extract.backbones import load_backbone  # noqa: E402
from finetune.experiment import run_finetune  # noqa: E402
from study.config import load_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--out", default=str(REPO / "out" / "bench"))
    p.add_argument("--policies", default="last:1,last:2")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--backbone-lr-mult", type=float, default=0.1)
    p.add_argument("--augment", default="light")
    p.add_argument("--precision", default="auto", help="bf16 speeds a CPU prefix-cache build ~2x (changes numerics)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    config = load_config(REPO / "configs" / "caltech101.toml")
    build = build_dataset(data_cfg=config["data"], data_root=Path(args.data_root), out_dir=out / "caltech101", seed=0)
    hp = config["finetune"]
    hp.update(epochs=args.epochs, views=args.views, lr=args.lr, backbone_lr_mult=args.backbone_lr_mult,
              augment=args.augment, precision=args.precision, num_workers=args.num_workers)
    backbone = load_backbone("efficientnet_lite0")
    rows = []
    for policy in args.policies.split(","):
        (row,) = run_finetune(backbone=backbone, policy=policy, manifest_path=build.manifest_path,
                              data_root=Path(args.data_root), hp=hp, seed=0, device=args.device,
                              finetune_dir=out / "caltech101_finetune" / "finetune",
                              prefix_dir=out / "caltech101_finetune" / "prefix")
        rows.append(row)
        print(f"{policy}: val {row['selection']['best_score']:.4f} (epoch {row['selection']['best_epoch']}) test "
              f"mean/class {row['metrics']['mean_per_class']:.4f} top1 {row['metrics']['top1']:.4f}; train "
              f"{row['train_s']:.0f}s (prefix cache {row['prefix_cache_s']:.0f}s), {row['epochs_run']} epochs",
              flush=True)
    best = max(rows, key=lambda r: r["selection"]["best_score"])  # chosen on val only
    m = best["metrics"]
    print(f"chosen={best['method']} val_mean_per_class={best['selection']['best_score']:.4f} "
          f"ft_mean_per_class={m['mean_per_class']:.4f} ci95={m['ci95']['mean_per_class'][0]:.4f}-"
          f"{m['ci95']['mean_per_class'][1]:.4f} top1={m['top1']:.4f} ft_train_s={best['train_s']:.0f} "
          f"epochs_run={best['epochs_run']} n_train={best['n_train']} n_test={best['n_test']} classes="
          f"{len(best['class_names'])} bar=0.93 meets_bar={m['mean_per_class'] >= 0.93}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
