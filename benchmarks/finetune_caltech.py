#!/usr/bin/env python
"""Caltech 101, standard protocol (102 classes, 30 training images per class of which 5 are val, rest test):
fine-tune each backbone with each candidate policy (``head``, ``last:k``, ``probe+last:k``) on the frozen
prefix's stored activations, each sweeping the config's grid on val and refit on train+val; pick the
(backbone, policy) with the best val mean per-class accuracy, report its test figures.

    python benchmarks/finetune_caltech.py [--data-root ../shared/datasets] [--backbones a,b] [--policies last:1,last:2]

The dataset comes from dataset.build.build_dataset with configs/caltech101.toml into out/bench/caltech101.
The activations at every policy's cut come from the per-image activation store out/bench/store (shared
with benchmarks/heads.py): one pass computes the rows any cut lacks, for all policies together, before the
first fine-tune; a fine-tune never makes a pass of its own, and its ``prefix_cache_s`` is the compute share
of the rows it read. Runs persist under out/bench/caltech101_finetune, so an interrupted benchmark resumes.
Target (issue 13): best_ft_mean_per_class >= 0.935 (a frozen-feature head reaches about 0.93).
Last line: key=value pairs starting with best_ft_mean_per_class= (the test figure of the fine-tune chosen
on val over every backbone, policy and ensemble run) and best_ft= (which one), then its ft_train_s= and CI.

``--ensembles a+b,...`` adds ensembles of fine-tunes to the candidates (finetune/ensemble.py): each member is its
backbone's val-chosen policy, their softmax outputs averaged, its val score the average's on val.

``--classes N`` keeps the N smallest classes of the manifest (a quick check, not the standard protocol).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dataset.build import build_dataset  # noqa: E402
from dataset.manifest import read_manifest, smallest_classes, write_manifest  # noqa: E402
from dataset.views import study_requests  # noqa: E402
from extract.backbones import load_backbone  # noqa: E402
from extract.engine import PassSettings, ensure_rows  # noqa: E402
from finetune.ensemble import ensemble_row  # noqa: E402
from finetune.experiment import StoreAccess, run_finetune, run_predictions  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from study.results import val_best  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--out", default=str(REPO / "out" / "bench"))
    p.add_argument("--backbones", default="efficientnet_lite0")
    p.add_argument("--policies", default="last:1,last:2")
    p.add_argument("--policies-for", action="append", default=[], metavar="BACKBONE=P1,P2",
                   help="this backbone's policies instead of --policies (repeatable), e.g. "
                        "efficientnet_lite2=head,last:1,last:2: a costly cut on one backbone only")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--backbone-lr-mult", type=float, default=0.1)
    p.add_argument("--augment", default="light")
    p.add_argument("--grid", default=None, help="the fine-tune grid as a TOML inline table, e.g. '{lr=[3e-3, 1e-2]}' "
                   "(default: the config's, lr [1e-3, 3e-3] x backbone_lr_mult [0.1, 0.3])")
    p.add_argument("--precision", default="auto",
                   help="training precision and the store pass's (bf16 speeds a CPU pass ~2x; changes numerics)")
    p.add_argument("--cut-dtype", default="float16", choices=("float16", "float32"),
                   help="storage dtype of the cut activations (part of the store entry key)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="the store pass's batch size")
    p.add_argument("--classes", type=int, default=0, help="keep the N smallest classes only (0: all; a quick check)")
    p.add_argument("--ensembles", default="", help="ensembles of fine-tunes to score and choose among with the "
                   "single ones, e.g. 'efficientnet_lite0+efficientnet_lite2,efficientnet_lite1+efficientnet_lite2': "
                   "each member is its backbone's val-chosen policy, their softmax averaged (finetune/ensemble.py)")
    args = p.parse_args()
    args.policies_of = {}
    for spec in args.policies_for:
        name, sep, listed = spec.partition("=")
        if not sep or name not in args.backbones.split(",") or not listed:
            p.error(f"--policies-for {spec!r}: allowed: BACKBONE=P1,P2 with BACKBONE one of --backbones")
        args.policies_of[name] = listed.split(",")
    args.ensemble_parts = [spec.split("+") for spec in args.ensembles.split(",") if spec]
    for parts in args.ensemble_parts:
        if len(set(parts)) < 2 or not set(parts) <= set(args.backbones.split(",")):
            p.error(f"--ensembles {'+'.join(parts)}: allowed: two or more different names from --backbones")
    return args


def dataset(args, config: dict, *, out: Path, data_root: Path):
    """The manifest (its N smallest classes with --classes), where it is, and the runs folder."""
    build = build_dataset(data_cfg=config["data"], data_root=data_root, out_dir=out / "caltech101", seed=0)
    manifest_path, runs_dir = build.manifest_path, out / "caltech101_finetune"
    manifest = read_manifest(manifest_path)
    if args.classes:
        manifest = smallest_classes(manifest, args.classes)
        runs_dir = out / f"caltech101_{args.classes}classes_finetune"
        manifest_path = runs_dir / "manifest.csv"
        runs_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(manifest, manifest_path)
    return manifest, manifest_path, runs_dir


def single_runs(args, *, manifest, manifest_path: Path, runs_dir: Path, data_root: Path, hp: dict,
                store: StoreAccess, loaded: dict) -> list[dict]:
    """Every (backbone, policy) fine-tune's row; ``loaded`` gets each backbone."""
    rows = []
    for name in args.backbones.split(","):
        policies = args.policies_of.get(name, args.policies.split(","))
        # The extract stage's role: one pass stores every cut's missing rows (each run_finetune then finds them).
        done = ensure_rows(manifest=manifest, backbone=name, store_root=store.root, policy=hp["augment"],
                           requests=study_requests(manifest, views=hp["views"], tta=hp["tta"]),
                           view_seed=store.view_seed, policies=policies, settings=store.settings, data_root=data_root)
        print(f"{name}: activation store {store.root}: computed {done.computed} image-views now ({done.seconds:.0f}s)"
              f" for {', '.join(done.stores)}", flush=True)
        backbone = loaded[name] = load_backbone(name)
        for policy in policies:
            (row,) = run_finetune(backbone=backbone, policy=policy, manifest_path=manifest_path, data_root=data_root,
                                  hp=hp, seed=0, device=args.device, finetune_dir=runs_dir / "finetune", store=store)
            rows.append(row)
            print(f"{name} {policy}: val {row['selection']['best_score']:.4f} (epoch {row['selection']['best_epoch']},"
                  f" {row['hyperparams']['lr']:g} x {row['hyperparams']['backbone_lr_mult']:g}) test mean/class "
                  f"{row['metrics']['mean_per_class']:.4f} top1 {row['metrics']['top1']:.4f}; train "
                  f"{row['train_s']:.0f}s (prefix cache {row['prefix_cache_s']:.0f}s), {row['epochs_run']} epochs",
                  flush=True)
    return rows


def ensemble_runs(args, rows: list[dict], *, manifest_path: Path, runs_dir: Path, data_root: Path, hp: dict,
                  store: StoreAccess, loaded: dict) -> list[dict]:
    """Each --ensembles row: its members are their backbones' val-chosen single runs."""
    out = []
    for parts in args.ensemble_parts:
        members = []
        for name in parts:
            member = val_best([r for r in rows if r["backbone"] == name])  # its backbone's val-chosen policy
            members.append((member, run_predictions(backbone=loaded[name], row=member, manifest_path=manifest_path,
                                                    data_root=data_root, hp=hp, seed=0, device=args.device,
                                                    finetune_dir=runs_dir / "finetune", store=store)))
        row = ensemble_row(members, n_boot=hp["n_boot"])
        out.append(row)
        print(f"{row['backbone']} {row['method']} ({row['selection']['grid'][0]['params']['members']}): val "
              f"{row['val_mean_per_class']:.4f} test mean/class {row['metrics']['mean_per_class']:.4f} top1 "
              f"{row['metrics']['top1']:.4f}; train {row['train_s']:.0f}s (the sum of its members')", flush=True)
    return out


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    out, data_root = Path(args.out), Path(args.data_root)
    config = load_config(REPO / "configs" / "caltech101.toml",
                         overrides=[f"finetune.grid={args.grid}"] if args.grid else [])
    manifest, manifest_path, runs_dir = dataset(args, config, out=out, data_root=data_root)
    hp = dict(config["finetune"])
    hp.update(epochs=args.epochs, views=args.views, lr=args.lr, backbone_lr_mult=args.backbone_lr_mult,
              augment=args.augment, precision=args.precision, num_workers=args.num_workers)
    settings = PassSettings(device=args.device, precision=args.precision, cut_dtype=args.cut_dtype,
                            batch_size=args.batch_size, num_workers=args.num_workers)
    store = StoreAccess(root=out / "store", settings=settings, view_seed=0)
    where = {"manifest_path": manifest_path, "runs_dir": runs_dir, "data_root": data_root, "hp": hp, "store": store}
    loaded: dict = {}
    rows = single_runs(args, manifest=manifest, loaded=loaded, **where)
    rows += ensemble_runs(args, rows, loaded=loaded, **where)
    best = val_best(rows)  # chosen on val only (ties: lower val log-loss, then the earlier run)
    m = best["metrics"]
    print(f"best_ft_mean_per_class={m['mean_per_class']:.4f} best_ft={best['backbone']}:{best['method']} "
          f"val_mean_per_class={best['val_mean_per_class']:.4f} ci95={m['ci95']['mean_per_class'][0]:.4f}-"
          f"{m['ci95']['mean_per_class'][1]:.4f} top1={m['top1']:.4f} ft_train_s={best['train_s']:.0f} "
          f"epochs_run={best['epochs_run']} n_train={best['n_train']} n_test={best['n_test']} classes="
          f"{len(best['class_names'])} target=0.935 meets_target={m['mean_per_class'] >= 0.935}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
