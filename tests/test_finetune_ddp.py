"""DDP on CPU with gloo and 2 processes: the ranks stay in sync and match one process with the doubled batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from extract.backbones import load_backbone
from finetune.model import build_split_net
from finetune.train import CachedSource, Trainer
from tests.finetune_fixtures import recipe

N_TRAIN, N_VAL, DIM, CLASSES = 32, 8, 512, 4


def _data():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N_TRAIN + N_VAL) % CLASSES
    centres = torch.randn(CLASSES, DIM, generator=g)
    acts = (centres[labels][:, None] + torch.randn(N_TRAIN + N_VAL, 2, DIM, generator=g)).half()
    return (CachedSource(acts[:N_TRAIN], labels[:N_TRAIN]),
            CachedSource(acts[N_TRAIN:, :1].contiguous(), labels[N_TRAIN:]))


def _train(ckpt_dir, batch_size: int) -> dict:
    hp = recipe()
    hp.update(epochs=2, batch_size=batch_size, lr=1e-2, warmup_epochs=0, patience=5,
              precision="fp32")  # compared with a tolerance of 1e-5: bf16 (the "auto" of a bf16 CPU) rounds more
    # Head policy: no BatchNorm trains, so DDP's averaged gradients equal one process's big-batch gradient.
    net = build_split_net(load_backbone("resnet18", pretrained=False), policy="head", n_classes=CLASSES, seed=0)
    train, val = _data()
    fit = Trainer(net=net, hp=hp, seed=0, device="cpu", ckpt_dir=ckpt_dir, run_key="ddp").fit(train, val)
    return {"state": net.trainable_state(), "loss": [h["train_loss"] for h in fit.history]}


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _train(os.path.join(out_dir, "ckpt"), batch_size=4)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_single_process(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _train(tmp_path / "single", batch_size=8)
    for key, value in single["state"].items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ckpt" / "last.pt").is_file()  # written once, by rank 0
