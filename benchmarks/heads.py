#!/usr/bin/env python
"""The head arm's default search on Caltech 101 (standard protocol), per backbone and split seed: val, and test with
``--final``.

    python benchmarks/heads.py [--split-seeds 100,101] [--backbones a,b] [--fusions a+b] [--classes N] [--final]
                               [--set KEY=VALUE ...] [--data-root ../shared/datasets] [--out out/bench]

Per split seed (default: configs/caltech101.toml's ``dev_seeds``, off the evaluation splits): that seed's manifest
(102 classes with background, 30 training images per class of which 5 are val, the rest test), the rows the heads
read in the store ``<out>/store`` (only missing ones computed), then the study's own classify stage: per backbone
(and fused set) one search of ``tune.trials`` trials over ``classify.heads``, ``classify.feature_sets`` and
``[tune.head]`` (the config's defaults; ``--set`` overrides any key), the chosen trial refit on train+val; a
finished search is reused from ``<out>/heads``. Nothing is chosen on test, and no test figure is printed without
``--final``. Last line: ``key=value`` pairs led by ``best_head_mean_per_class`` (``--final``: the mean over split
seeds of the test score of the head chosen on val over every backbone and fused set) or else
``best_head_val_mean_per_class`` (that head's val score). ``--classes N`` keeps the N smallest classes (a quick
check, not the standard protocol).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--out", default=str(REPO / "out" / "bench"), help="manifests, store, searches and runs go here")
    p.add_argument("--split-seeds", default="", help="comma-separated split seeds (default: the config's dev_seeds)")
    p.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    p.add_argument("--fusions", default="efficientnet_lite0+efficientnet_lite2",
                   help="comma-separated fused feature sets, each backbones joined by '+' ('' for none)")
    p.add_argument("--classes", type=int, default=0, help="keep the N smallest classes only (0: all; a quick check)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, as run_study.py --set (e.g. 'tune.trials=24')")
    p.add_argument("--device", default="cpu", help="the extract pass's device")
    p.add_argument("--final", action="store_true", help="also print test scores (never used to choose anything)")
    return p.parse_args(argv)


def bench_config(args) -> dict:
    """configs/caltech101.toml with the benchmark's backbones and fusions, ``--set`` and no few-shot curve."""
    from pipeline.config import load_config

    fusions = [f.split("+") for f in args.fusions.split(",") if f]
    overrides = [f"extract.backbones={json.dumps(args.backbones.split(','))}",
                 f"classify.fusions={json.dumps(fusions)}", "fewshot.k=[]", *args.set]
    return load_config(REPO / "configs" / "caltech101.toml", overrides=overrides)


def split_seeds(args, config: dict) -> list[int]:
    return [int(s) for s in args.split_seeds.split(",") if s.strip()] or list(config["dev_seeds"])


def seed_context(args, config: dict, seed: int):
    """A study context over split seed ``seed``'s standard-protocol manifest (its N smallest classes with
    ``--classes``), in a fresh run folder under ``<out>/bench-heads``."""
    from dataset.build import build_dataset
    from dataset.manifest import read_manifest, smallest_classes, write_manifest
    from study.context import StudyContext

    out = Path(args.out)
    build = build_dataset(data_cfg=config["data"], data_root=Path(args.data_root),
                          out_dir=out / "caltech101" / f"seed-{seed}", seed=seed)
    suffix = f"-{args.classes}classes" if args.classes else ""
    run_dir = out / "bench-heads" / f"{time.strftime('%Y%m%dT%H%M%S')}-seed-{seed}{suffix}"
    ctx = StudyContext(config={**config, "seed": seed, "seeds": [seed]}, data_root=Path(args.data_root),
                       out_dir=out, run_dir=run_dir, device=args.device, split_seed_dir=f"bench-seed-{seed}{suffix}")
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    ctx.dataset_dir.mkdir(parents=True, exist_ok=True)
    if args.classes:
        write_manifest(smallest_classes(read_manifest(build.manifest_path), args.classes), ctx.manifest_path)
    else:
        shutil.copyfile(build.manifest_path, ctx.manifest_path)
    return ctx


def extract_rows(ctx) -> None:
    """The rows the heads read, stored (computed where missing), listed in the run's features.json as the extract
    stage lists them."""
    import os

    from classify.stacked import CUT, STAGES
    from dataset.manifest import read_manifest
    from dataset.views import study_requests
    from extract.engine import ensure_rows
    from extract.stage import pass_settings

    cfg, manifest = ctx.config["extract"], read_manifest(ctx.manifest_path)
    cuts = [CUT] if STAGES in ctx.config["classify"]["feature_sets"] else []
    entries = []
    for name in cfg["backbones"]:
        result = ensure_rows(manifest=manifest, backbone=name, store_root=ctx.store_dir, policy=cfg["policy"],
                             requests=study_requests(manifest, views=cfg["views"], tta=cfg["tta"]),
                             view_seed=cfg["view_seed"], policies=cuts,
                             settings=pass_settings(cfg, device=ctx.device), data_root=ctx.data_root)
        print(f"split seed {ctx.seed}: {name}: computed {result.computed} image-views now ({result.seconds:.1f}s)",
              flush=True)
        entries.append({"backbone": name, "store": os.path.relpath(result.stores["pooled"].dir, ctx.out_dir),
                        "layers": {n: os.path.relpath(s.dir, ctx.out_dir) for n, s in result.stores.items()}})
    (ctx.run_dir / "features.json").write_text(json.dumps(entries, indent=2) + "\n")


def search_seed(ctx) -> tuple[list, list]:
    """The head rows and trials of the classify stage on split seed ``ctx.seed`` (finished searches reused)."""
    import classify.stage
    from study.results import read_results, read_trials

    extract_rows(ctx)
    classify.stage.run(ctx)
    return [r for r in read_results(ctx.results_path) if r.kind == "head"], read_trials(ctx.run_dir)


def print_search(row, trials: list, *, final: bool) -> None:
    own = [t for t in trials if t.backbone == row.backbone]
    edges = sorted({k for t in own for k in t.at_edge})
    test = f"{row.metrics.mean_per_class:>10.4f}" if final else ""
    print(f"{row.split_seed:<6}{row.backbone:<46}{len(own):>7}{sum(t.seconds for t in own):>10.1f}"
          f"{row.val_mean_per_class:>10.4f}{test}  {row.method}({row.feature_set}) {row.hyperparams}"
          + (f"  [values at a range's edge in some trials: {', '.join(edges)}]" if edges else ""), flush=True)


def summary(chosen: dict, rows: list, *, final: bool) -> str:
    """The last line: the val-chosen head per split seed and, with ``final``, its test score; means over seeds."""
    import numpy as np

    pairs = {}
    if final:
        pairs["best_head_mean_per_class"] = f"{np.mean([r.metrics.mean_per_class for r in chosen.values()]):.4f}"
    pairs["best_head_val_mean_per_class"] = f"{np.mean([r.val_mean_per_class for r in chosen.values()]):.4f}"
    pairs["best_heads"] = ",".join(f"{s}:{r.backbone}:{r.method}({r.feature_set})" for s, r in chosen.items())
    pairs["split_seeds"] = ",".join(map(str, chosen))
    pairs["search_s"] = f"{sum(r.costs.train_s for r in rows):.1f}"
    for backbone in dict.fromkeys(r.backbone for r in rows):
        mine = [r for r in rows if r.backbone == backbone]
        pairs[f"{backbone}_val_mean_per_class"] = f"{np.mean([r.val_mean_per_class for r in mine]):.4f}"
        if final:
            pairs[f"{backbone}_mean_per_class"] = f"{np.mean([r.metrics.mean_per_class for r in mine]):.4f}"
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def main(argv=None) -> None:
    from study.results import val_best

    args = parse_args(argv)
    config = bench_config(args)
    seeds = split_seeds(args, config)
    print(f"Caltech 101 standard protocol{f', {args.classes} smallest classes' if args.classes else ''}; split seeds "
          f"{seeds}; per backbone one search of {config['tune']['trials']} trials over {config['classify']['heads']} "
          f"x {config['classify']['feature_sets']} ({config['tune']['sampler']}); "
          + ("test printed (--final)" if args.final else "val only (--final adds test)"), flush=True)
    results = {seed: search_seed(seed_context(args, config, seed)) for seed in seeds}
    print(f"{'seed':<6}{'backbone':<46}{'trials':>7}{'trials_s':>10}{'val_mpc':>10}"
          + (f"{'test_mpc':>10}" if args.final else "") + "  chosen on val")
    chosen, rows = {}, []
    for seed, (heads, trials) in results.items():
        for row in heads:
            print_search(row, trials, final=args.final)
        chosen[seed] = val_best(heads)  # over every backbone and fused set of this split seed, on val
        rows += heads
    print(summary(chosen, rows, final=args.final))


if __name__ == "__main__":
    main()
