"""The fine-tuning loop: discriminative LRs, AdamW/SGD, warm-up + cosine, label smoothing, early stopping on
val mean per-class accuracy, best checkpoint kept, resume from the last epoch, AMP + channels-last on CUDA,
DDP under torchrun.

Training data comes from a *source*: ``CachedSource`` (prefix activations, one cached view per image per
epoch, only the suffix runs) or ``ImageSource`` (the naive path: decode, fresh augmentation, full forward).
Every epoch's randomness (order, view draws, dropout) comes from a seed derived from (seed, epoch), so a
resumed run repeats exactly what an uninterrupted one would have done.

``Trainer.fit`` trains on train and keeps the best val epoch (a grid point's run); ``Trainer.fit_fixed``
trains a fixed number of epochs and evaluates nothing (the chosen point's refit on train+val).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from dataset.tensors import ImageViews
from dataset.transforms import tta_views, view_seed
from finetune.checkpoint import load_checkpoint, save_checkpoint
from study import distributed, heap
from study.console import bars_shown
from study.errors import StudyError
from study.metrics import mean_per_class_accuracy
from study.precision import autocast_dtype

log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int) -> int:
    return view_seed(seed=seed, sample_id="finetune-epoch", view=epoch)


def shard(order: torch.Tensor) -> torch.Tensor:
    """This rank's share of ``order``, padded by wrapping so every rank runs the same number of steps."""
    rank, world = distributed.rank(), distributed.world_size()
    if world == 1:
        return order
    per_rank = math.ceil(len(order) / world)
    padded = torch.cat([order, order[: per_rank * world - len(order)]])
    return padded[rank::world]


class CachedSource:
    """Prefix activations (N, V, ...) float16; each training epoch draws one view per image.

    Evaluation runs the first ``eval_views`` views of every image (view 0, then its test-time views)
    and ``Trainer.predict`` averages their logits.
    """

    uses_prefix = True

    def __init__(self, acts: torch.Tensor, labels: torch.Tensor, *, eval_views: int = 1):
        if not 1 <= eval_views <= acts.shape[1]:
            raise ValueError(f"eval_views={eval_views}; allowed: 1..{acts.shape[1]} (the cached views per image)")
        self.acts, self.labels, self.eval_views = acts, labels, eval_views

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, *, epoch: int, seed: int, batch_size: int, train: bool) -> Iterator:
        if not train:
            for lo in range(0, len(self), batch_size):
                views = self.acts[lo : lo + batch_size, : self.eval_views]
                yield views.flatten(0, 1).float(), self.labels[lo : lo + batch_size]
            return
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = shard(torch.randperm(len(self), generator=g))
        views = torch.randint(0, self.acts.shape[1], (len(self),), generator=g)
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            yield self.acts[idx, views[idx]].float(), self.labels[idx]


class ImageSource:
    """Images from the manifest: training draws a fresh augmentation view per epoch; evaluation uses the
    clean view and its test-time views (``tta``), whose logits ``Trainer.predict`` averages.

    One DataLoader per batch size, with persistent workers, serves every epoch (the sampler's items change).
    """

    uses_prefix = False

    def __init__(self, *, rows, data_root: Path, data_config: dict, policy: str, num_workers: int,
                 tta: str = "none"):
        self.labels = torch.tensor(rows["label"].to_numpy(np.int64))
        self.policy, self.num_workers = policy, num_workers
        self.eval_view_ids = [0, *tta_views(tta)]
        self.eval_views = len(self.eval_view_ids)
        self._rows, self._data_root, self._data_config = rows, data_root, data_config
        self._loaders: dict[tuple[int, int], tuple] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def _loader(self, batch_size: int, seed: int):
        if (batch_size, seed) not in self._loaders:
            data = ImageViews.of_manifest(self._rows, data_root=self._data_root, data_config=self._data_config,
                                          policy=self.policy, seed=seed, views=[self.eval_view_ids] * len(self))
            sampler = _EpochItems()
            loader = DataLoader(data, sampler=sampler, batch_size=batch_size, num_workers=self.num_workers,
                                persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
            self._loaders[(batch_size, seed)] = (loader, sampler)
        return self._loaders[(batch_size, seed)]

    def batches(self, *, epoch: int, seed: int, batch_size: int, train: bool) -> Iterator:
        loader, sampler = self._loader(batch_size, seed)
        if not train:
            sampler.items = list(range(len(self)))  # an int item is all of its eval views, stacked
            for images, index in loader:
                yield images.flatten(0, 1), self.labels[index]
            return
        # View ids >= 1 are augmented; a new id per epoch is a fresh augmentation, still reproducible.
        view = epoch + 1 if self.policy != "none" else 0
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        sampler.items = [(int(i), view) for i in shard(torch.randperm(len(self), generator=g))]
        for images, index in loader:
            yield images[:, 0], self.labels[index]


class _EpochItems(Sampler):
    """A sampler whose items the caller sets before each epoch, so one loader (and its workers) serves them all."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


class NotFinished(StudyError):
    """A run asked for its finished result (``resume_only``) whose checkpoints would train further."""

    @classmethod
    def at(cls, ckpt_dir: Path, epoch: int) -> "NotFinished":
        return cls(f"{ckpt_dir} is not a finished fine-tune (its resume point is after epoch {epoch}, or missing or "
                   "damaged): the model its row was scored with is gone, and it is not retrained silently")


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_score: float
    epochs_run: int
    train_s: float
    resumed_from: int | None = None
    stopped_early: bool = False
    best_log_loss: float | None = None  # val log-loss at the best epoch (ties between grid points)
    extra: dict = field(default_factory=dict)


def make_optimizer(net, hp: dict) -> torch.optim.Optimizer:
    groups = net.trainable_parameters()
    param_groups = [{"params": groups["head"], "lr": hp["lr"]}]
    if groups["trunk"]:
        param_groups.append({"params": groups["trunk"], "lr": hp["lr"] * hp["backbone_lr_mult"]})
    if hp["optimizer"] == "sgd":
        return torch.optim.SGD(param_groups, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                               nesterov=True)
    return torch.optim.AdamW(param_groups, lr=hp["lr"], weight_decay=hp["weight_decay"])


def make_scheduler(optimizer, *, steps_per_epoch: int, hp: dict) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = hp["warmup_epochs"] * steps_per_epoch
    total = max(hp["epochs"] * steps_per_epoch, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trains_channels_last(device: str) -> bool:
    """Channels-last on CUDA (cuDNN's fast convolutions) only. On a CPU it is no steady gain
    (benchmarks/finetune_layout.py, a 2-core bf16 CPU, the ``last:1`` training step channels-last over contiguous:
    Lite0 1.17x in fp32 but 0.97x in bf16, Lite2 0.97x and 0.92x; a CPU without bf16, where "auto" trains in fp32,
    was not measured); MPS neither."""
    return torch.device(device).type == "cuda"


def to_training_layout(x, *, device: str):
    """A module or a batch on ``device``, channels-last where it is 4-D and ``trains_channels_last(device)``."""
    channels_last = trains_channels_last(device)
    if isinstance(x, nn.Module):
        return x.to(device, memory_format=torch.channels_last) if channels_last else x.to(device)
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def training_loss(out, y: torch.Tensor, *, loss_fn, aux_weight: float) -> torch.Tensor:
    """The loss of a training forward's output, in float: logits, or (logits, aux logits) where an aux head trains."""
    if isinstance(out, tuple):
        logits, aux = out
        return loss_fn(logits.float(), y) + aux_weight * loss_fn(aux.float(), y)
    return loss_fn(out.float(), y)


class Trainer:
    """One fine-tuning run of ``net`` (finetune.model.SplitNet); checkpoints live in ``ckpt_dir``."""

    def __init__(self, *, net, hp: dict, seed: int, device: str, ckpt_dir: Path, run_key: str):
        self.net, self.hp, self.seed, self.device = net, hp, seed, device
        self.ckpt_dir, self.run_key = Path(ckpt_dir), run_key
        self.amp = autocast_dtype(hp["precision"], device)
        self.net = to_training_layout(self.net, device=device)
        self.model = None  # the module the loss is computed through; DDP-wrapped under torchrun, see _bind
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=hp["label_smoothing"])

    def _bind(self, *, from_prefix: bool) -> None:
        module = _SuffixOnly(self.net) if from_prefix else self.net
        if distributed.world_size() > 1:
            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.model = module

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return to_training_layout(x, device=self.device)

    def _autocast(self):
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.amp, enabled=self.amp is not None)

    def _loss(self, out, y: torch.Tensor) -> torch.Tensor:
        return training_loss(out, y, loss_fn=self.loss_fn, aux_weight=self.hp["aux_weight"])

    def train_epoch(self, source, *, epoch: int, optimizer, scheduler, scaler) -> dict:
        self.model.train()
        total, n, t0 = 0.0, 0, time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.seed, epoch))  # scoped: dropout / drop-path draws of this epoch
            batches = source.batches(epoch=epoch, seed=self.seed, batch_size=self.hp["batch_size"], train=True)
            for x, y in heap.trimmed(batches):
                x, y = self._to_device(x), y.to(self.device)
                with self._autocast():
                    out = self.model(x)
                loss = self._loss(out, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total, n = total + loss.item() * len(y), n + len(y)
        seconds = time.perf_counter() - t0
        return {"train_loss": total / max(n, 1), "train_s": seconds, "img_per_s": n / max(seconds, 1e-9)}

    @torch.no_grad()
    def predict(self, source) -> np.ndarray:
        """Logits (N, C) for every item of ``source`` in order: the mean over its eval views (the clean
        view and any test-time views), float32."""
        self.net.eval()
        out, n_views = [], source.eval_views
        batch_size = max(1, max(self.hp["batch_size"], 64) // n_views)
        for x, _ in heap.trimmed(source.batches(epoch=0, seed=self.seed, batch_size=batch_size, train=False)):
            with self._autocast():
                x = self._to_device(x)
                logits = self.net.forward_suffix(x) if source.uses_prefix else self.net(x)
            logits = logits.float().cpu()
            out.append(logits.reshape(-1, n_views, logits.shape[-1]).mean(1))
        return torch.cat(out).numpy()

    def _setup(self, train):
        hp = self.hp
        steps = math.ceil(math.ceil(len(train) / distributed.world_size()) / hp["batch_size"])
        optimizer = make_optimizer(self.net, hp)
        scheduler = make_scheduler(optimizer, steps_per_epoch=steps, hp=hp)
        scaler = torch.amp.GradScaler(enabled=self.amp == torch.float16)
        state = self._resume(optimizer, scheduler, scaler)
        self._bind(from_prefix=train.uses_prefix)
        return optimizer, scheduler, scaler, state

    def _save_last(self, state: dict, optimizer, scheduler, scaler) -> None:
        self._save("last.pt", {**state, "model": self.net.trainable_state(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "hp": self.hp})

    def evaluate(self, source) -> tuple[float, float]:
        """(mean per-class accuracy, log-loss) of the averaged eval-view logits on ``source``."""
        logits = torch.from_numpy(self.predict(source))
        score = mean_per_class_accuracy(source.labels.numpy(), logits.argmax(1).numpy())
        return score, float(nn.functional.cross_entropy(logits, source.labels))

    def fit(self, train, val, *, on_epoch_end: Callable[[int, dict], None] | None = None,
            resume_only: bool = False) -> FitResult:
        """Train on ``train``, score every epoch on ``val``; stop after ``patience`` epochs without a better val
        mean per-class accuracy; the model kept (and loaded at the end) is the best epoch's. ``resume_only``:
        a finished run's kept model, or ``NotFinished`` where an epoch would train."""
        hp = self.hp
        optimizer, scheduler, scaler, state = self._setup(train)
        resumed_from = state["epoch"] if state["epoch"] >= 0 else None
        if resume_only and state["epoch"] + 1 < hp["epochs"] and state["bad_epochs"] < hp["patience"]:
            raise NotFinished.at(self.ckpt_dir, state["epoch"])
        bar = tqdm(range(state["epoch"] + 1, hp["epochs"]), desc=f"finetune {hp.get('name', '')}", unit="epoch",
                   leave=False, disable=not (distributed.is_main() and bars_shown()))
        for epoch in bar:
            if state["bad_epochs"] >= hp["patience"]:
                break
            t0 = time.perf_counter()
            stats = self.train_epoch(train, epoch=epoch, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            score, log_loss = self.evaluate(val)
            stats = {"epoch": epoch, "val_mean_per_class": score, "val_log_loss": log_loss,
                     "lr": optimizer.param_groups[0]["lr"], "epoch_s": time.perf_counter() - t0, **stats}
            state["history"].append(stats)
            improved = score > state["best_score"]
            if improved:
                state.update(best_score=score, best_log_loss=log_loss, best_epoch=epoch, bad_epochs=0)
                self._save("best.pt", {"epoch": epoch, "score": score, "model": self.net.trainable_state()})
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            self._save_last(state, optimizer, scheduler, scaler)
            bar.set_postfix(loss=f"{stats['train_loss']:.3f}", val=f"{score:.3f}", img_s=f"{stats['img_per_s']:.0f}")
            log.info("epoch %d: loss %.4f val mean/class %.4f (%.0f img/s)", epoch, stats["train_loss"], score,
                     stats["img_per_s"])
            if on_epoch_end is not None:
                on_epoch_end(epoch, stats)
        bar.close()
        best = load_checkpoint(self.ckpt_dir / "best.pt", run_key=self.run_key)
        self.net.load_trainable_state(best["model"])
        return FitResult(history=state["history"], best_epoch=state["best_epoch"], best_score=state["best_score"],
                         epochs_run=len(state["history"]), train_s=sum(h["epoch_s"] for h in state["history"]),
                         resumed_from=resumed_from, stopped_early=len(state["history"]) < hp["epochs"],
                         best_log_loss=state["best_log_loss"])

    def fit_fixed(self, train, *, epochs: int, on_epoch_end: Callable[[int, dict], None] | None = None,
                  resume_only: bool = False) -> FitResult:
        """Train exactly ``epochs`` epochs on ``train``, nothing evaluated, no early stopping: the refit (on
        train+val) of a setting chosen on val, for the epoch count val chose. The learning-rate schedule is the
        recipe's (warm-up + cosine over ``hp["epochs"]``), so the refit follows the chosen run's schedule up to
        that epoch. Resumes from ``last.pt``; the model kept is the last epoch's."""
        hp = self.hp
        if not 1 <= epochs <= hp["epochs"]:
            raise ValueError(f"a refit of {epochs} epochs; allowed: 1..{hp['epochs']} (finetune.epochs)")
        optimizer, scheduler, scaler, state = self._setup(train)
        resumed_from = state["epoch"] if state["epoch"] >= 0 else None
        if resume_only and state["epoch"] + 1 < epochs:
            raise NotFinished.at(self.ckpt_dir, state["epoch"])
        for epoch in range(state["epoch"] + 1, epochs):
            t0 = time.perf_counter()
            stats = self.train_epoch(train, epoch=epoch, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            stats = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "epoch_s": time.perf_counter() - t0,
                     **stats}
            state["history"].append(stats)
            state["epoch"] = epoch
            self._save_last(state, optimizer, scheduler, scaler)
            log.info("refit epoch %d: loss %.4f (%.0f img/s)", epoch, stats["train_loss"], stats["img_per_s"])
            if on_epoch_end is not None:
                on_epoch_end(epoch, stats)
        return FitResult(history=state["history"], best_epoch=epochs - 1, best_score=math.nan,
                         epochs_run=len(state["history"]), train_s=sum(h["epoch_s"] for h in state["history"]),
                         resumed_from=resumed_from, stopped_early=False)

    def _resume(self, optimizer, scheduler, scaler) -> dict:
        fresh = {"epoch": -1, "history": [], "best_score": -1.0, "best_log_loss": math.inf, "best_epoch": -1,
                 "bad_epochs": 0}
        last = load_checkpoint(self.ckpt_dir / "last.pt", run_key=self.run_key)
        if last is None:
            return fresh
        self.net.load_trainable_state(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        scaler.load_state_dict(last["scaler"])
        log.info("resuming %s after epoch %d", self.ckpt_dir, last["epoch"])
        return {k: last.get(k, v) for k, v in fresh.items()}

    def _save(self, name: str, payload: dict) -> None:
        if distributed.is_main():
            save_checkpoint(self.ckpt_dir / name, {"run_key": self.run_key, **payload})
        distributed.barrier()


class _SuffixOnly(nn.Module):
    """``net.forward_suffix`` as a module call, so DDP's hooks see it (the frozen prefix is not trained)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor):
        return self.net.forward_suffix(a)
