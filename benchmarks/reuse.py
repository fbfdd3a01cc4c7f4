"""What the per-image activation store saves: the extract and finetune stages for split seed 0, then for
split seed 1 into the same ``--out``, with every forward pass through the backbone counted.

    python benchmarks/reuse.py [--config configs/default.toml] [--backbone efficientnet_lite0] [--out DIR]

Per run it prints the image-views computed, the forward passes (the shared pass and any pass through a
fine-tune's frozen prefix) and the seconds of each consumer; then the bare forward's throughput on
the same machine (preloaded tensors, same precision and layout, no decoding, no storing) as the baseline.
Last line: ``passes_per_image=... second_seed_fraction=... prefix_vs_forward=...``:

- passes_per_image: forward passes per computed image-view in run 1, all consumers together;
- second_seed_fraction: seconds computing activations in run 2 / run 1;
- prefix_vs_forward: the shared pass's throughput (images/s, decoding and storing included) / the bare forward's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class Counter:
    """Counts images through the shared pass and through any fine-tune prefix (a second pass would show here)."""

    def __init__(self):
        self.pass_images = 0
        self.prefix_images = 0

    def install(self, mp) -> None:
        from extract import engine
        from finetune import model

        real_pass, real_prefix = engine.PassRunner.__call__, model.SplitNet.forward_prefix
        counter = self

        def counted_pass(runner, images):
            counter.pass_images += len(images)
            return real_pass(runner, images)

        def counted_prefix(net, x):
            counter.prefix_images += len(x)
            return real_prefix(net, x)

        mp.setattr(engine.PassRunner, "__call__", counted_pass)
        mp.setattr(model.SplitNet, "forward_prefix", counted_prefix)


def finished_run(run_dir: Path, seed: int) -> dict:
    """A seed's figures from its run folder (``--run1``): the pass's own count and seconds; forwards not counted."""
    (entry,) = json.loads((run_dir / "features.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    return {"seed": seed, "computed": entry["computed"], "pass_s": entry["seconds"], "wall_s": float("nan"),
            "pass_images": None, "prefix_images": None,
            "finetune": {r["method"]: r["train_epochs_s"] for r in rows if r["kind"] == "finetune"}}


def run_seed(*, args, seed: int, counter: Counter) -> dict:
    import run_study

    before = (counter.pass_images, counter.prefix_images)
    t0 = time.perf_counter()
    argv = ["--config", args.config, "--data-root", args.data_root, "--out", str(args.out),
            "--stages", "dataset,extract,finetune", "--set", f"seed={seed}", "--set", f"seeds=[{seed}]",
            "--set", f'extract.backbones=["{args.backbone}"]', "--set", f"finetune.epochs={args.epochs}",
            "--set", f"finetune.policies={json.dumps(args.policies)}"]
    assert run_study.main(argv) == 0
    wall = time.perf_counter() - t0
    run_dir = sorted((args.out / "runs").iterdir())[-1]
    (entry,) = json.loads((run_dir / "features.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    return {"seed": seed, "computed": entry["computed"], "pass_s": entry["seconds"], "wall_s": wall,
            "pass_images": counter.pass_images - before[0], "prefix_images": counter.prefix_images - before[1],
            "finetune": {r["method"]: r["train_epochs_s"] for r in rows if r["kind"] == "finetune"}}


def bare_forward(*, args, n: int = 256, batch: int = 64) -> float:
    """Images/s of the backbone alone on preloaded tensors (the ceiling any pass can reach here)."""
    import torch

    from extract.backbones import load_backbone
    from pipeline.config import load_config
    from study.precision import autocast, resolve_precision

    cfg = load_config(args.config)["extract"]
    bb = load_backbone(args.backbone)
    precision = resolve_precision(cfg["precision"], "cpu")
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = bb.model.eval().to(memory_format=fmt)
    size = bb.data_config["crop_size"]
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    with torch.inference_mode(), autocast(precision, "cpu"):
        model(x[:8])  # warm-up
        t0 = time.perf_counter()
        for _ in range(n // batch):
            model(x)
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    import pytest

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "default.toml"))
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--out", type=Path, default=REPO / "out" / "bench_reuse")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--policies", default="head,last:1,last:2", type=lambda s: s.split(","))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep --out (default: start from an empty folder)")
    p.add_argument("--run1", type=Path, default=None,
                   help="the seed-0 run folder of an earlier, interrupted benchmark in --out: only seed 1 runs "
                        "(its forwards counted), seed 0's figures are read from the folder (implies --keep)")
    args = p.parse_args(argv)
    # Every stage's code now, once: a file edited while the benchmark runs must not mix into a later stage.
    for module in ("run_study", "dataset.stage", "extract.stage", "finetune.stage"):
        __import__(module)
    if not args.keep and args.run1 is None:
        shutil.rmtree(args.out, ignore_errors=True)
    counter = Counter()
    mp = pytest.MonkeyPatch()
    counter.install(mp)
    try:
        first = finished_run(args.run1, 0) if args.run1 else run_seed(args=args, seed=0, counter=counter)
        runs = [first, run_seed(args=args, seed=1, counter=counter)]
    finally:
        mp.undo()
    forward = bare_forward(args=args)
    print(f"\n{'run':<8}{'image-views':>12}{'shared pass':>13}{'prefix fwd':>12}{'pass s':>9}{'img/s':>8}"
          "  fine-tune epochs s")
    for r in runs:
        rate = r["computed"] / r["pass_s"] if r["pass_s"] else float("nan")
        counted = [("-" if r[k] is None else r[k]) for k in ("pass_images", "prefix_images")]
        print(f"seed {r['seed']:<3}{r['computed']:>12}{counted[0]:>13}{counted[1]:>12}{r['pass_s']:>9.1f}"
              f"{rate:>8.1f}  " + ", ".join(f"{m} {s:.1f}" for m, s in r["finetune"].items()))
    first, second = runs
    counted = first if first["pass_images"] is not None else second  # --run1: the forwards of run 2
    passes = (counted["pass_images"] + counted["prefix_images"]) / max(counted["computed"], 1)
    if counted is second:
        print("passes_per_image counts run 2's forwards (run 1's were not counted: --run1)")
    pass_rate = first["computed"] / first["pass_s"]
    print(f"bare forward ({args.backbone}, preloaded tensors): {forward:.1f} img/s; shared pass {pass_rate:.1f} img/s")
    store = args.out / "store"
    for entry in sorted(store.iterdir()):
        spec = json.loads((entry / "spec.json").read_text())
        size = sum(s.stat().st_size for s in entry.glob("seg-*.h5"))
        n = first["computed"] + second["computed"]
        print(f"store {spec['layer']['name']:<18} {spec['storage_dtype']:<8} {size / 2**20:8.1f} MiB, "
              f"{size / max(n, 1) / 1024:.1f} KiB per image-view")
    print(f"passes_per_image={passes:.3f} second_seed_fraction={second['pass_s'] / first['pass_s']:.3f} "
          f"prefix_vs_forward={pass_rate / forward:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
