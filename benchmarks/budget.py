#!/usr/bin/env python
"""Both arms tuned alike: the default trial budget on Caltech 101 (standard protocol), Lite0, dev split seeds.

    python benchmarks/budget.py [--split-seeds 100] [--backbone efficientnet_lite0] [--final]

For each split seed (default: the config's ``dev_seeds``), the study's own stages run on the standard-protocol
manifest with the default config's ``[tune]``, ``[classify]`` and ``[finetune]``: the shared pass, the head arm's
search and the fine-tune arm's search, ``tune.trials`` trials each. Beside them, in the same run, the fine-tune
recipe the study used before the tuner (``head`` / ``last:1`` / ``probe+last:1`` x lr {3e-3, 1e-2}, 5 epochs,
weight decay 0.01, label smoothing 0.1, trunk x0.1) is trained on the same splits and chosen on val.
Per arm: trials, pruned trials, best val, seconds. Val only; test figures only with ``--final``.

Last line, key=value: ``trials_ratio`` (fine-tune trials / head trials), ``ft_last_epoch_fraction`` (chosen
fine-tunes whose best epoch is the last the space allows), ``edge_fraction`` (chosen parameters within 5% of an
end of a log-scaled range, both arms), ``ft_val_gain_pts`` (the tuned fine-tune's val minus the old recipe's, same
seed, mean over seeds). Targets: 1.0, <= 0.2, 0, >= 0.5.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.caltech import add_protocol_args, manifest_path, split_seeds, study_context  # noqa: E402

OLD_GRID = [(policy, lr) for policy in ("head", "last:1", "probe+last:1") for lr in (3e-3, 1e-2)]
OLD_RECIPE = {"epochs": 5, "weight_decay": 0.01, "label_smoothing": 0.1, "backbone_lr_mult": 0.1}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_protocol_args(p, backbone_flag="--backbone", final_help="also print the chosen models' test scores")
    return p.parse_args()


def config_for(args, seed: int) -> dict:
    from pipeline.config import load_config

    return load_config(REPO / "configs" / "default.toml", overrides=[
        *args.overrides, f'extract.backbones=["{args.backbone}"]', "classify.fusions=[]", "finetune.ensembles=[]",
        "fewshot.k=[]", f"seed={seed}", "seeds=[]", "dev_seeds=[]",
        'name="budget"'])


def run_arms(args, seed: int) -> dict:
    """The study's own extract, classify and finetune stages on one split seed; the rows and trials they wrote."""
    import classify.stage
    import extract.stage
    import finetune.stage
    from study.results import read_results, read_trials

    config = config_for(args, seed)
    manifest = manifest_path(data_root=Path(args.data_root), out=Path(args.out), seed=seed, classes=args.classes)
    run_dir = Path(args.out) / "bench" / "budget" / f"seed-{seed}-{int(time.time())}"
    ctx = study_context(config=config, manifest=manifest, out=Path(args.out), data_root=Path(args.data_root),
                        run_dir=run_dir)
    seconds = {}
    for name, stage in (("extract", extract.stage), ("head", classify.stage), ("finetune", finetune.stage)):
        t0 = time.perf_counter()
        stage.run(ctx)
        seconds[name] = time.perf_counter() - t0
    return {"ctx": ctx, "rows": read_results(ctx.results_path), "trials": read_trials(run_dir), "wall": seconds}


def old_recipe_val(ctx, backbone: str) -> float:
    """The best val of the pre-tuner fine-tune grid, trained on the same split (fits cached under --out)."""
    from dataset.manifest import read_manifest
    from extract.backbones import load_backbone
    from extract.stage import finetune_views, pass_settings
    from finetune.experiment import _Experiment, experiment_inputs
    from finetune.inputs import StoreAccess

    ecfg = ctx.config["extract"]
    hp = {**ctx.config["finetune"], "views": finetune_views(ctx.config), "patience": 5}
    bb = load_backbone(backbone)
    manifest = read_manifest(ctx.manifest_path)
    store = StoreAccess(root=ctx.store_dir, settings=pass_settings(ecfg, device="cpu"), view_seed=ecfg["view_seed"])
    rows, base = experiment_inputs(backbone=bb, phases=["head", "last:1"], manifest=manifest, hp=hp,
                                   seed=ctx.seed, device="cpu", store=store, data_root=ctx.data_root)
    exp = _Experiment(backbone=bb, manifest=manifest, hp=hp, seed=ctx.seed, device="cpu",
                      finetune_dir=ctx.finetune_dir, rows=rows, base=base, on_epoch_end=None)
    scores = []
    for policy, lr in OLD_GRID:
        scores.append(exp.select(policy, {**OLD_RECIPE, "lr": lr})[-1].result.best_score)
        exp.forget()
    return max(scores)


def summarise(arms: dict, *, seed: int, final: bool, old_val: float) -> dict:
    from study import tune

    cfg = arms["ctx"].config["tune"]
    out = {"old_val": old_val}
    for arm in ("head", "finetune"):
        trials = [t for t in arms["trials"] if t.arm == arm]
        (row,) = [r for r in arms["rows"] if r.arm == arm]
        chosen = next(t for t in trials if t.number == row.selection.best.extra["trial"])
        space = tune.parse_space(cfg[arm], integers=tune.HEAD_INTEGERS + tune.FINETUNE_INTEGERS)
        logs = [k for k in chosen.params if k in space and space[k].log]
        out[arm] = {"trials": len(trials), "pruned": sum(t.state == "PRUNED" for t in trials),
                    "best_val": row.val_mean_per_class, "seconds": sum(t.seconds for t in trials),
                    "chosen": chosen.params, "edges": [k for k in logs if space[k].at_edge(chosen.params[k])],
                    "log_params": len(logs), "test": row.metrics.mean_per_class if final else None}
        print(f"seed {seed} {arm:<9} trials {out[arm]['trials']:>3} pruned {out[arm]['pruned']:>3} "
              f"best val {100 * row.val_mean_per_class:6.2f}  {out[arm]['seconds']:8.1f} s  chosen {chosen.params}"
              + (f"  test {100 * row.metrics.mean_per_class:.2f}" if final else ""), flush=True)
    ft_row = next(r for r in arms["rows"] if r.arm == "finetune")
    out["ft_last_epoch"] = int(ft_row.hyperparams["best_epoch"]) + 1 >= int(cfg["finetune"]["epochs"]["high"]
                                                                             if isinstance(cfg["finetune"]["epochs"], dict)
                                                                             else max(cfg["finetune"]["epochs"]))
    print(f"seed {seed} old fine-tune recipe (6 settings, 5 epochs): best val {100 * old_val:6.2f}; "
          f"stage seconds {json.dumps({k: round(v, 1) for k, v in arms['wall'].items()})}", flush=True)
    return out


def main() -> int:
    import logging

    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    per_seed = []
    for seed in split_seeds(args.split_seeds):
        arms = run_arms(args, seed)
        per_seed.append(summarise(arms, seed=seed, final=args.final,
                                  old_val=old_recipe_val(arms["ctx"], args.backbone)))
    n = len(per_seed)
    ratio = sum(s["finetune"]["trials"] for s in per_seed) / max(1, sum(s["head"]["trials"] for s in per_seed))
    edges = sum(len(s[a]["edges"]) for s in per_seed for a in ("head", "finetune"))
    logs = sum(s[a]["log_params"] for s in per_seed for a in ("head", "finetune"))
    gain = sum(s["finetune"]["best_val"] - s["old_val"] for s in per_seed) / n
    tail = (f"trials_ratio={ratio:.2f} ft_last_epoch_fraction={sum(s['ft_last_epoch'] for s in per_seed) / n:.2f} "
            f"edge_fraction={edges / max(1, logs):.2f} ft_val_gain_pts={100 * gain:+.2f} "
            f"head_val={100 * sum(s['head']['best_val'] for s in per_seed) / n:.2f} "
            f"ft_val={100 * sum(s['finetune']['best_val'] for s in per_seed) / n:.2f} split_seeds={n}")
    if args.final:
        tail += (f" head_test={100 * sum(s['head']['test'] for s in per_seed) / n:.2f}"
                 f" ft_test={100 * sum(s['finetune']['test'] for s in per_seed) / n:.2f}")
    print(tail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
