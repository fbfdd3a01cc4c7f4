#!/usr/bin/env python
"""Heads on every offline backbone's features of Caltech 101 (standard protocol): sweep time and test accuracy.

    python benchmarks/heads.py [--data-root ../shared/datasets] [--out out/bench] [--backbones a,b] [--fusions a+b]

Builds (or reuses) the Caltech 101 manifest (configs/caltech101.toml: 102 classes with background,
30 training images per class of which 5 are val, the rest test) and each backbone's rows in the
activation store ``<out>/store`` (clean view of every image, 2 light views of train/val; with ``--tta hflip``,
the default, each image's mirror too; the ``last:1`` cut for the ``stages`` set; only rows the store lacks
are computed, so ``--out`` pointing at a study's folder reuses its rows), then, for each backbone (and
fused set), head and feature set (``clean``, ``aug``, ``stages`` = pooled + the spatial mean of the last:1
cut), runs the full val sweep + refit with the default ``[classify]`` grids and scores test once.
Printed beside them, in the same run:

- the SVM kernels measured separately on the first backbone (linear vs RBF: sweep seconds, val and test);
- ablations, one at a time on the first backbone's clean features: each head without the signed square
  root (``power=1``), and LR without the mirror averaging (``no-tta``);
- the effect of ``aug`` and ``stages`` against ``clean`` per backbone and head, on val and on test;
- the *tutorial baseline*: one clean view, StandardScaler + LR, fit on train+val, with C picked ON
  TEST. It is optimistic by construction (it peeks at test) and is only the bar to clear.

Last line: ``key=value`` pairs, starting with ``best_head_mean_per_class`` (the test figure of the head
chosen ON VAL over every backbone, fused set, head and feature set) and ``best_head`` (which one).

``--classes N`` keeps the N smallest classes of the manifest (a quick check, not the standard protocol).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--out", default=str(REPO / "out" / "bench"), help="manifest and activation store go here")
    p.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    p.add_argument("--fusions", default="efficientnet_lite0+efficientnet_lite2",
                   help="comma-separated fused feature sets, each backbones joined by '+' ('' for none)")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--tta", default="hflip", choices=("none", "hflip"),
                   help="extract.tta: also embed each image mirrored; heads use the mean (the study default)")
    p.add_argument("--heads", default="lr,svm,knn")
    p.add_argument("--feature-sets", default="clean,aug,stages",
                   help="clean, aug, stages (pooled + the last:1 cut's spatial mean); fused sets use clean/aug")
    p.add_argument("--svm-kernels", default="linear,rbf", help="kernels measured side by side ('' to skip)")
    p.add_argument("--ablations", default="on", choices=("on", "off"),
                   help="power=1 and no-tta ablations on the first backbone's clean features")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="the extract pass's batch size")
    p.add_argument("--precision", default="auto", help="the extract pass's precision (part of the store entry key)")
    p.add_argument("--classes", type=int, default=0, help="keep the N smallest classes only (0: all; a quick check)")
    return p.parse_args()


def caltech_manifest(args):
    from dataset.build import build_dataset
    from dataset.manifest import read_manifest, smallest_classes
    from pipeline.config import load_config

    build = build_dataset(data_cfg=load_config(REPO / "configs" / "caltech101.toml")["data"],
                          data_root=Path(args.data_root), out_dir=Path(args.out) / "caltech101", seed=0)
    return smallest_classes(read_manifest(build.manifest_path), args.classes)


def load_caltech_features(args, manifest, backbone: str) -> dict:
    """{feature set name: FeatureSet} of one backbone: the pooled set (read as clean/aug) and 'stages'."""
    from classify.stacked import CUT, STAGES, load_stages_set
    from dataset.views import study_requests
    from extract.cache import load_feature_set
    from extract.engine import PassSettings, ensure_rows

    stages = STAGES in args.feature_sets.split(",")
    settings = PassSettings(precision=args.precision, batch_size=args.batch_size, num_workers=args.num_workers)
    result = ensure_rows(manifest=manifest, backbone=backbone, store_root=Path(args.out) / "store", policy="light",
                         requests=study_requests(manifest, views=args.views, tta=args.tta), view_seed=0,
                         policies=[CUT] if stages else [], settings=settings, data_root=Path(args.data_root))
    fs = load_feature_set(result.stores["pooled"], manifest=manifest, views=args.views, tta=args.tta,
                          policy="light", view_seed=0)
    print(f"{backbone}: activation store {result.stores['pooled'].dir}: computed {result.computed} image-views now "
          f"({result.seconds:.1f}s); the rows read cost {fs.extract_s:.1f}s of compute", flush=True)
    sets = {"clean": fs, "aug": fs}
    if stages:
        sets[STAGES] = load_stages_set(result.stores["pooled"], result.stores[CUT], manifest=manifest, tta=args.tta,
                                       policy="light", view_seed=0)
    return sets


def run_head(method, head_cfg, *, data, n_classes):
    from classify.heads import head_grid
    from classify.selection import select_and_refit
    from study.metrics import mean_per_class_accuracy

    fit = select_and_refit(method, head_grid(method, head_cfg), data=data, seed=0, head_cfg=head_cfg,
                           n_classes=n_classes)
    val = max(s["val_mean_per_class"] for s in fit.selection.scores)
    return fit, val, mean_per_class_accuracy(data.test.y, fit.test_pred)


def tutorial_baseline(data, c_grid) -> tuple[float, float, float]:
    """StandardScaler + LR on plain view-0 train+val, C chosen by TEST score (optimistic on purpose)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from study.metrics import mean_per_class_accuracy

    X = np.concatenate([data.train.X, data.val.X])
    y = np.concatenate([data.train.y, data.val.y])
    t0, best = time.perf_counter(), (-1.0, None)
    for C in c_grid:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(X, y)
        best = max(best, (mean_per_class_accuracy(data.test.y, model.predict(data.test.X)), C))
    return best[0], best[1], time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    from classify.config import SCHEMA
    from classify.fusion import fuse, fused_name
    from classify.heads import blas_threads
    from study.schema import validate

    cfg = validate({}, SCHEMA, prefix="classify")
    manifest = caltech_manifest(args)
    sets = {b: load_caltech_features(args, manifest, b) for b in args.backbones.split(",")}
    for fusion in filter(None, args.fusions.split(",")):
        parts = fusion.split("+")
        fused = fuse({b: sets[b]["clean"] for b in parts})
        sets[fused_name(parts)] = {"clean": fused, "aug": fused}
    with blas_threads(cfg["blas_threads"]):
        report(args, cfg=cfg, sets=sets, manifest=manifest)


def head_datasets(args, sets: dict, manifest) -> dict:
    """{(backbone, feature set): HeadData} for every requested feature set the backbone (or fused set) has."""
    from classify.features import head_data

    out = {}
    for backbone, by_name in sets.items():
        for fset in args.feature_sets.split(","):
            if fset in by_name:
                out[(backbone, fset)] = head_data(by_name[fset], manifest,
                                                  feature_set="aug" if fset == "aug" else "clean")
    return out


def report(args, *, cfg, sets, manifest) -> None:
    from classify.features import head_data

    n_classes = int(manifest["label"].max()) + 1
    datasets = head_datasets(args, sets, manifest)
    first = args.backbones.split(",")[0]
    clean = datasets[(first, "clean")]
    plain = head_data(sets[first]["clean"], manifest, feature_set="clean", tta=False)  # view 0 alone, as a tutorial
    print(f"Caltech 101 features: {n_classes} classes, train {len(clean.train)}, val {len(clean.val)}, "
          f"test {len(clean.test)}; backbones {list(sets)}")
    print(f"{'backbone':<44}{'head':<12}{'features':<10}{'grid':>6}{'sweep_s':>10}{'val_mpc':>10}{'test_mpc':>10}"
          "  chosen")
    figures = {}  # (backbone, label, feature set) -> (sweep s, val, val log-loss, test)

    def run(backbone, label, method, head_cfg, fset, data):
        fit, val, test = run_head(method, head_cfg, data=data, n_classes=n_classes)
        loss = next(s["val_log_loss"] for s in fit.selection.scores if s["params"] == fit.selection.best)
        figures[(backbone, label, fset)] = (fit.train_s, val, loss, test)
        print(f"{backbone:<44}{label:<12}{fset:<10}{len(fit.selection.scores):>6}{fit.train_s:>10.1f}{val:>10.4f}"
              f"{test:>10.4f}  {fit.selection.best}", flush=True)

    for (backbone, fset), data in datasets.items():
        for m in args.heads.split(","):
            run(backbone, m, m, cfg[m], fset, data)
    # RBF needs larger C than the linear kernel's grid (its val optimum here is C ~ 1).
    kernel_grids = {"linear": {"kernel": ["linear"]}, "rbf": {"kernel": ["rbf"], "C": [0.3, 1.0, 3.0, 10.0, 30.0]}}
    for k in filter(None, args.svm_kernels.split(",")):
        run(first, f"svm:{k}", "svm", {**cfg["svm"], **kernel_grids[k]}, "clean", clean)
    if args.ablations == "on":
        for m in args.heads.split(","):
            run(first, f"{m}:power=1", m, {**cfg[m], "power": [1.0]}, "clean", clean)
        if (np.asarray(sets[first]["clean"].view) < 0).any():
            run(first, "lr:no-tta", "lr", cfg["lr"], "clean", plain)
    base_mpc, base_c, base_s = tutorial_baseline(plain, cfg["lr"]["C"])
    print(f"{first:<44}{'tutorial':<12}{'clean':<10}{len(cfg['lr']['C']):>6}{base_s:>10.1f}{'-':>10}{base_mpc:>10.4f}"
          f"  StandardScaler + LR, C={base_c} PICKED ON TEST (optimistic baseline)")
    for extra in ("aug", "stages"):
        effects = [f"{b} {m} val {figures[(b, m, extra)][1] - figures[(b, m, 'clean')][1]:+.4f} test "
                   f"{figures[(b, m, extra)][3] - figures[(b, m, 'clean')][3]:+.4f}"
                   for (b, m, f) in figures if f == extra and (b, m, "clean") in figures]
        if effects:
            print(f"{extra} - clean, mean per-class accuracy: " + "; ".join(effects))
    # The best head over every backbone, fused set, head and feature set, chosen on val (ties: lower val
    # log-loss); ablation and kernel runs are measurements, not candidates.
    candidates = {key: v for key, v in figures.items() if key[1] in args.heads.split(",")}
    def loss(x):  # unknown (SVM) or NaN counts as worst, as in study.results.val_best
        return float("inf") if x is None or x != x else x
    best = max(candidates, key=lambda key: (candidates[key][1], -loss(candidates[key][2])))
    pairs = {"best_head_mean_per_class": f"{candidates[best][3]:.4f}", "best_head": f"{best[0]}:{best[1]}({best[2]})",
             "best_head_val": f"{candidates[best][1]:.4f}", "best_head_sweep_s": f"{candidates[best][0]:.1f}",
             "tutorial_test_picked_mean_per_class": f"{base_mpc:.4f}"}
    pairs.update({f"{b}_{m.replace(':', '_')}_{f}_mean_per_class": f"{v[3]:.4f}" for (b, m, f), v in figures.items()})
    print(" ".join(f"{k}={v}" for k, v in pairs.items()))


if __name__ == "__main__":
    main()
