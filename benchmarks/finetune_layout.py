#!/usr/bin/env python
"""A fine-tune's training step, channels-last vs contiguous (what finetune.train.Trainer uses on a CPU), in each
precision: the evidence for ``finetune.train.trains_channels_last``.

One backbone split for a policy (default Lite0 ``last:1``), its frozen prefix run once over a batch of real Caltech
images, then the same AdamW steps of the trainable suffix timed in both memory layouts, fp32 and, where the CPU has
native bf16, bf16 autocast (the trainer's "auto").

    python benchmarks/finetune_layout.py [--data-root ../shared/datasets] [--policy last:1] [--steps 15] [--rounds 3]

Last line: key=value pairs incl. layout_speedup_fp32= (and layout_speedup_bf16=): channels-last img/s over contiguous.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.images import load_rgb  # noqa: E402
from dataset.transforms import eval_transform  # noqa: E402
from extract.backbones import load_backbone  # noqa: E402
from finetune.model import build_split_net  # noqa: E402
from study.precision import cpu_has_native_bf16  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _images(data_root: Path, *, n: int, data_config: dict) -> torch.Tensor:
    files = sorted((data_root / "caltech101" / "101_ObjectCategories").glob("*/*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"error: {n} Caltech images asked for, {len(files)} found under {data_root}")
    transform = eval_transform(data_config)
    return torch.stack([transform(load_rgb(f)) for f in files])


def _rate(net, acts, labels, *, channels_last: bool, dtype, steps: int) -> float:
    """Images/s of AdamW steps on ``acts`` (float16, as the store holds them: each step converts its batch, as the
    trainer's batches do)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=layout)  # explicitly: the trainer's own helper keeps a CPU contiguous
    conv = next(m.weight for m in net.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1
                and m.kernel_size != (1, 1))
    assert conv.is_contiguous(memory_format=layout)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    net.train()

    def step():
        x = acts.float().contiguous(memory_format=layout)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = net.forward_suffix(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = nn.functional.cross_entropy(out.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):  # oneDNN prepares its kernels and AdamW its state in the first steps
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(labels) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--policy", default="last:1")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per layout, alternating")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    bb = load_backbone(args.backbone)
    x = _images(Path(args.data_root), n=args.batch_size, data_config=bb.data_config)
    labels = torch.arange(len(x)) % 10
    precisions = {"fp32": None, **({"bf16": torch.bfloat16} if cpu_has_native_bf16() else {})}
    figures = {"backbone": args.backbone, "policy": args.policy, "batch": len(x), "threads": torch.get_num_threads()}
    print(f"{args.backbone} {args.policy}: training steps of {len(x)} real Caltech images' prefix activations")
    print(f"{'precision':>9} {'contiguous img/s':>17} {'channels-last img/s':>20} {'ratio':>6}")
    for name, dtype in precisions.items():
        net = build_split_net(bb, policy=args.policy, n_classes=10)
        with torch.no_grad():
            acts = net.forward_prefix(x).half()
        # Rounds alternate the layouts (contiguous, channels-last, contiguous, ...) so that a drift of the machine's
        # load does not favour one; each layout's figure is the median of its rounds.
        runs = {False: [], True: []}
        for r in range(2 * args.rounds):
            cl = bool(r % 2)
            runs[cl].append(_rate(build_split_net(bb, policy=args.policy, n_classes=10), acts, labels,
                                  channels_last=cl, dtype=dtype, steps=args.steps))
        rates = [statistics.median(runs[False]), statistics.median(runs[True])]
        print(f"{name:>9} {rates[0]:17.1f} {rates[1]:20.1f} {rates[1] / rates[0]:6.2f}")
        figures.update({f"contiguous_img_s_{name}": rates[0], f"channels_last_img_s_{name}": rates[1],
                        f"layout_speedup_{name}": rates[1] / rates[0]})
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
