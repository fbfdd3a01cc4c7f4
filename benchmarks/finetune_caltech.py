#!/usr/bin/env python
"""The fine-tune arm on Caltech 101 (standard protocol), with the study's default recipe: its tuner search per backbone.

    python benchmarks/finetune_caltech.py [--split-seeds 100,101] [--backbones efficientnet_lite0] [--final]

For each split seed (default: the config's ``dev_seeds``) the study's own extract and finetune stages run on the
standard-protocol manifest (configs/caltech101.toml: 102 classes, 30 labelled images per class of which 5 are
val, the rest test) with the default config's ``[finetune]`` and ``[tune]``: one search of ``tune.trials`` trials
per backbone, the chosen trial refit on train+val. Per seed and backbone: the chosen policy and setting, its val
score, trials and pruned trials, seconds. Val only; the test scores (and the means below) only with ``--final``.

Last line, key=value: ``best_ft_val_mean_per_class`` (mean over seeds of the val score of the fine-tune chosen on
val over the backbones) and, with ``--final``, ``best_ft_mean_per_class`` (the mean over seeds of that same
fine-tune's test mean per-class accuracy) and ``best_ft``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.caltech import add_protocol_args, manifest_path, split_seeds, study_context  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_protocol_args(p, backbone_flag="--backbones", final_help="also print the chosen fine-tunes' test scores")
    return p.parse_args()


def run_seed(args, seed: int) -> list:
    """The extract and finetune stages on one split seed; its fine-tune rows."""
    import extract.stage
    import finetune.stage
    from pipeline.config import load_config
    from study.results import read_results

    backbones = [b for b in args.backbones.split(",") if b]
    config = load_config(REPO / "configs" / "default.toml", overrides=[
        *args.overrides, f"extract.backbones={backbones}", "classify.fusions=[]", "finetune.ensembles=[]",
        "fewshot.k=[]", f"seed={seed}", "seeds=[]", "dev_seeds=[]", 'name="finetune_caltech"'])
    manifest = manifest_path(data_root=Path(args.data_root), out=Path(args.out), seed=seed, classes=args.classes)
    ctx = study_context(config=config, manifest=manifest, out=Path(args.out), data_root=Path(args.data_root),
                        run_dir=Path(args.out) / "bench" / "finetune" / f"seed-{seed}-{int(time.time())}")
    extract.stage.run(ctx)
    finetune.stage.run(ctx)
    return read_results(ctx.results_path)


def main() -> int:
    import logging

    from study.results import val_best

    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    chosen = []
    for seed in split_seeds(args.split_seeds):
        rows = run_seed(args, seed)
        for r in rows:
            print(f"seed {seed} {r.backbone:<20} {r.method:<16} val {100 * r.val_mean_per_class:6.2f}  trials "
                  f"{r.n_variants}  {r.costs.train_s:8.1f} s  {r.selection.best.params}"
                  + (f"  test {100 * r.metrics.mean_per_class:.2f}" if args.final else ""), flush=True)
        chosen.append(val_best(rows))
    n = len(chosen)
    tail = f"best_ft_val_mean_per_class={sum(r.val_mean_per_class for r in chosen) / n:.4f} split_seeds={n}"
    if args.final:
        tail = (f"best_ft_mean_per_class={sum(r.metrics.mean_per_class for r in chosen) / n:.4f} "
                f"best_ft={'/'.join(sorted({f'{r.backbone}:{r.method}' for r in chosen}))} " + tail)
    print(tail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
