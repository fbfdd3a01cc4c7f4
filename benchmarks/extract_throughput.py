#!/usr/bin/env python
"""Extraction throughput on N Caltech images, one backbone, three ways, in one run:

(a) naive: the tutorial loop (PIL decode + transform in the main process, fp32, contiguous, no_grad);
(b) engine: the shared pass, extract.engine.ensure_rows (workers, channels-last, the precision resolver's
    autocast, pooled features + the activations at every --policies cut written to the store), timed end
    to end (model load, workers, checksummed segments included);
(c) forward: the model alone on ready tensors (a few batches of real images, cycled over N), same precision and
    memory layout as (b): the ceiling;
(d) decode: the images decoded and transformed in one process, no model: the decoding's CPU cost.

The engine runs twice in one run: as before issue 24 ("engine_before": segment writes in the loop, each worker
making its images float and normalising them) and as now ("engine": writes overlapped with the forward in a
thread, uint8 images made float once per batch), and says where its seconds went: waiting for
decoded images, the forward, buffering rows, row digests and segment writes (the writer thread's), and waiting
for the writer. The 1-minute load average before and after is printed: on a shared machine other jobs take
cores from every phase.

Each phase runs in its own process so its peak RSS (ru_maxrss) is its own; "max child" is the
largest DataLoader worker's (forked, so it counts pages shared with the parent). Last line: key=value pairs incl. speedup_vs_naive (b/a) and fraction_of_forward (b/c).
If the engine's default precision is reduced (bf16/fp16), it also reports the accuracy effect:
mean per-class accuracy of a logistic-regression head on fp32 vs reduced-precision features.

    python benchmarks/extract_throughput.py --n 2048
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--out", default=str(REPO / "out" / "bench"), help="where the Caltech manifest is built/reused")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--n", type=int, default=256, help="number of Caltech images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1,
                   help="decoding processes (1: what extract.num_workers = 'auto' resolves to on a CPU)")
    p.add_argument("--precision", default="auto", help="engine precision (auto = the engine's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default="last:1,last:2", help="fine-tune cuts the shared pass stores too")
    p.add_argument("--accuracy-classes", type=int, default=20,
                   help="Caltech classes for the fp32-vs-reduced accuracy check (only when reduced precision is used)")
    p.add_argument("--phases", default="naive,engine_before,engine,forward,decode",
                   help="which phases to run, in this order (comma-separated)")
    p.add_argument("--phase", choices=["naive", "engine", "engine_before", "forward", "decode", "accuracy"],
                   help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def caltech_manifest(args) -> Path:
    from dataset.build import build_dataset
    from pipeline.config import load_config

    build = build_dataset(data_cfg=load_config(REPO / "configs" / "caltech101.toml")["data"],
                          data_root=Path(args.data_root), out_dir=Path(args.out) / "caltech101", seed=0)
    return build.manifest_path


def subset_manifest(manifest_path: Path, *, n: int, seed: int, out: Path) -> Path:
    from dataset.manifest import read_manifest, write_manifest

    df = read_manifest(manifest_path)
    rows = np.sort(np.random.default_rng(seed).choice(len(df), size=min(n, len(df)), replace=False))
    path = out / f"subset_{n}_{seed}.csv"
    write_manifest(df.iloc[rows], path)
    return path


def class_subset_manifest(manifest_path: Path, *, n_classes: int, out: Path) -> Path:
    from dataset.manifest import read_manifest, write_manifest

    df = read_manifest(manifest_path)
    keep = df[df["label"] < n_classes]
    path = out / f"classes_{n_classes}.csv"
    write_manifest(keep, path)
    return path


# ---------------------------------------------------------------- phases (each in its own process)


def _peak() -> dict:
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def phase_naive(args) -> dict:
    import torch

    from dataset.images import load_rgb
    from dataset.manifest import read_manifest
    from dataset.transforms import eval_transform
    from extract.backbones import load_backbone

    bb = load_backbone(args.backbone)
    tf, model = eval_transform(bb.data_config), bb.model.eval()
    paths = [Path(args.data_root) / p for p in read_manifest(args.manifest)["path"]]
    feats = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(paths), args.batch_size):
            batch = torch.stack([tf(load_rgb(p)) for p in paths[s:s + args.batch_size]])
            feats.append(model(batch).numpy())
    seconds = time.perf_counter() - t0
    return {"images": len(paths), "seconds": seconds, "precision": "fp32", "layout": "contiguous", **_peak()}


def _pass(args, store_dir, *, precision: str, policies: list[str], before: bool = False):
    from dataset.manifest import read_manifest
    from dataset.views import study_requests
    from extract.engine import PassSettings, ensure_rows

    manifest = read_manifest(args.manifest)
    settings = PassSettings(precision=precision, batch_size=args.batch_size, num_workers=args.num_workers,
                            progress=False, overlap_writes=not before, float_in_batches=not before)
    return manifest, ensure_rows(manifest=manifest, backbone=args.backbone, store_root=store_dir, policy="none",
                                 view_seed=0, requests=study_requests(manifest, views=0, tta="none"),
                                 policies=policies, settings=settings, data_root=args.data_root)


def phase_engine(args, *, before: bool = False) -> dict:
    from study.precision import resolve_precision

    with tempfile.TemporaryDirectory() as store_dir:
        t0 = time.perf_counter()
        manifest, result = _pass(args, store_dir, precision=args.precision,
                                 policies=[p for p in args.policies.split(",") if p], before=before)
        seconds = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(store_dir).rglob("seg-*.h5"))
    return {"images": len(manifest), "seconds": seconds, "cache_mb": size / 2**20, "pass_s": result.seconds,
            "timings": result.timings, "precision": resolve_precision(args.precision, "cpu"),
            "layout": "channels_last", **_peak()}


def phase_decode(args) -> dict:
    """Decode + eval transform of every image in one process (what the DataLoader workers do, without the model)."""
    from dataset.images import load_rgb
    from dataset.manifest import read_manifest
    from dataset.transforms import eval_transform
    from extract.backbones import backbone_spec, load_backbone

    backbone_spec(args.backbone, pretrained=False)
    tf = eval_transform(load_backbone(args.backbone, pretrained=False).data_config)
    paths = [Path(args.data_root) / p for p in read_manifest(args.manifest)["path"]]
    t0 = time.perf_counter()
    for p in paths:
        tf(load_rgb(p))
    return {"images": len(paths), "seconds": time.perf_counter() - t0, "precision": "-", "layout": "-", **_peak()}


# The forward phase cycles through this many batches of real decoded images: the ceiling is the model's speed on
# ready tensors, and holding all N images as float tensors (2048 x 224 px: 1.2 GB, twice with the channels-last
# copies) halved the bare forward on the AVX2-only CPU (16 vs 34 img/s for the same batch, tested in one process),
# so the "ceiling" came out below the engine that streams its batches (fraction_of_forward 1.67).
FORWARD_POOL = 4


def phase_forward(args) -> dict:
    import torch

    from dataset.images import load_rgb
    from dataset.manifest import read_manifest
    from dataset.transforms import eval_transform
    from extract.backbones import load_backbone
    from study.precision import autocast, resolve_precision

    bb = load_backbone(args.backbone)
    tf = eval_transform(bb.data_config)
    paths = list(read_manifest(args.manifest)["path"])
    pool = paths[:FORWARD_POOL * args.batch_size]
    images = torch.stack([tf(load_rgb(Path(args.data_root) / p)) for p in pool])
    precision = resolve_precision(args.precision, "cpu")
    model = bb.model.eval().to(memory_format=torch.channels_last)

    def runner(x):
        with torch.inference_mode(), autocast(precision, "cpu"):
            return model(x)
    ready = [images[s:s + args.batch_size].contiguous(memory_format=torch.channels_last)
             for s in range(0, len(images), args.batch_size)]
    sizes = [min(args.batch_size, len(paths) - s) for s in range(0, len(paths), args.batch_size)]
    t0 = time.perf_counter()
    for i, size in enumerate(sizes):
        runner(ready[i % len(ready)][:size])
    seconds = time.perf_counter() - t0
    return {"images": len(paths), "seconds": seconds, "precision": precision, "layout": "channels_last", **_peak()}


def phase_accuracy(args) -> dict:
    """Mean per-class accuracy of an LR head on fp32 vs the engine's reduced-precision features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from extract.cache import load_feature_set
    from study.precision import resolve_precision

    scores = {}
    with tempfile.TemporaryDirectory() as store_dir:
        for precision in ("fp32", resolve_precision(args.precision, "cpu")):
            manifest, result = _pass(args, store_dir, precision=precision, policies=[])
            fs = load_feature_set(result.stores["pooled"], manifest=manifest, views=0, tta="none", policy="none",
                                  view_seed=0)
            train, test = fs.split != "test", fs.split == "test"
            head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=args.seed))
            head.fit(fs.features[train], fs.labels[train])
            scores[precision] = balanced_accuracy_score(fs.labels[test], head.predict(fs.features[test]))
    return {"acc_fp32": scores["fp32"], "acc_reduced": scores[resolve_precision(args.precision, "cpu")]}


PHASES = {"naive": phase_naive, "engine": phase_engine, "engine_before": lambda a: phase_engine(a, before=True),
          "forward": phase_forward, "decode": phase_decode, "accuracy": phase_accuracy}


def run_phase(name: str, args, manifest: Path) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--manifest", str(manifest), "--data-root", args.data_root,
           "--backbone", args.backbone, "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
           "--precision", args.precision, "--seed", str(args.seed), "--policies", args.policies]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_breakdown(name: str, r: dict) -> None:
    """Where the pass's seconds went: the main thread's parts add up to the pass; the writer's run beside them
    when overlapped (then only 'wait write' holds the loop up)."""
    t = r["timings"]
    main = {k: t.get(k, 0.0) for k in ("wait_data", "forward", "buffer", "wait_write")}
    other = r["pass_s"] - sum(main.values())
    parts = ", ".join(f"{k} {v:.1f}s ({v / r['pass_s']:.0%})" for k, v in main.items())
    print(f"{name}: pass {r['pass_s']:.1f}s of {r['seconds']:.1f}s (model load, workers' start, store setup: the "
          f"rest); main thread: {parts}, other {other:.1f}s; writer: digest {t.get('digest', 0):.1f}s, "
          f"write {t.get('write', 0):.1f}s")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return 0

    out = Path(args.out) / "extract_throughput"
    out.mkdir(parents=True, exist_ok=True)
    full = caltech_manifest(args)
    manifest = subset_manifest(full, n=args.n, seed=args.seed, out=out)
    load_start = os.getloadavg()[0]
    results = {name: run_phase(name, args, manifest) for name in args.phases.split(",")}
    load_end = os.getloadavg()[0]
    n_images = next(iter(results.values()))["images"]
    print(f"{args.backbone}, {n_images} Caltech images, batch {args.batch_size}, {args.num_workers} workers, "
          f"{os.cpu_count()} CPUs, load average (1 min) {load_start:.2f} before, {load_end:.2f} after")
    print(f"{'':8} {'img/s':>8} {'seconds':>8} {'precision':>9} {'layout':>13} {'peak RSS MB':>11} {'max child MB':>12}")
    for name, r in results.items():
        r["img_s"] = r["images"] / r["seconds"]
        print(f"{name:8} {r['img_s']:8.1f} {r['seconds']:8.1f} {r['precision']:>9} {r['layout']:>13} "
              f"{r['peak_rss_mb']:11.0f} {r['workers_peak_rss_mb']:12.0f}")
    figures = {f"{name}_img_s": r["img_s"] for name, r in results.items()}
    for name in ("engine_before", "engine"):
        if name in results:
            print_breakdown(name, results[name])
    if {"engine", "naive"} <= set(results):
        figures["speedup_vs_naive"] = results["engine"]["img_s"] / results["naive"]["img_s"]
    for name in ("engine", "engine_before"):
        if {name, "forward"} <= set(results):
            forward = results["forward"]["img_s"]
            figures[name.replace("engine", "fraction_of_forward")] = results[name]["img_s"] / forward
            # Steady state: the pass alone (model load, workers' start and store setup left out).
            figures[name.replace("engine", "pass_fraction_of_forward")] = \
                results[name]["images"] / results[name]["pass_s"] / forward
    if "engine" in results:
        figures.update(engine_peak_mb=results["engine"]["peak_rss_mb"],
                       engine_workers_peak_mb=results["engine"]["workers_peak_rss_mb"])
    figures.update(load_avg_start=load_start, load_avg_end=load_end)
    from study.precision import resolve_precision

    precision = resolve_precision(args.precision, "cpu")
    if precision != "fp32" and "accuracy" in args.phases:
        acc = run_phase("accuracy", args, class_subset_manifest(full, n_classes=args.accuracy_classes, out=out))
        print(f"LR head mean per-class accuracy on {args.accuracy_classes} Caltech classes: "
              f"fp32 {acc['acc_fp32']:.4f}, {precision} {acc['acc_reduced']:.4f}")
        figures.update(acc_fp32=acc["acc_fp32"], acc_reduced=acc["acc_reduced"],
                       acc_delta=acc["acc_reduced"] - acc["acc_fp32"])
    elif precision == "fp32":
        print("engine precision is fp32 here (auto picks bf16 only on CUDA or CPUs with native bf16), "
              "so there is no reduced-precision accuracy effect to report")
    else:
        print(f"engine precision is {precision}; add the 'accuracy' phase to measure its effect on a head")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                   {"backbone": args.backbone, "n": n_images, "precision": precision,
                    **figures}.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
