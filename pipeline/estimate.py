"""How long a study will take on this machine, stage by stage, from throughputs measured here and now.

Per backbone a short calibration (a few seconds, nothing written, no progress shown) times: loading the model;
decoding real images of the manifest with the eval transform and the shared pass's forward over them (the
extraction rate, unless the store recorded the rate of an earlier pass); and, per one-phase fine-tune policy, a
training step (forward + backward + AdamW) and an evaluation forward of the trained part on what it reads (pooled
features for ``head``, the stored cut for ``last:k``; the whole network from images where the naive path runs).
The heads' fits are timed on synthetic features of the study's shapes (rows, width, classes).

The model of a run: extraction = image-views to compute / rate; a head search = trials x the mean fit of the
configured methods on the mean feature set, plus the refit; a fine-tune search = trials x the mean over the policies
of (expected epochs x (train images / train rate + val views / eval rate) + a trial's set-up), plus the refit; the
few-shot curves and the report on top. Expected epochs are the middle of the searched range, shortened by early
stopping and pruning (``EPOCH_SHARE``, measured on the quick study). The figure assumes the machine's load stays
as it was while calibrating.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)
# Of the epochs a trial may run (the middle of the searched range), the share trials ran in the quick study and the
# 4-class own-data study (early stopping, Hyperband): what the plan counts.
EPOCH_SHARE = 0.85
TRIAL_SETUP_S = 0.3  # a fine-tune trial's fixed cost: splitting the network, the optimiser, the tuner's storage
EPOCH_SETUP_S = 0.2  # an epoch's fixed cost: its checkpoints (written durably), the tuner's report
HEAD_SEARCH_SETUP_S = 1.0  # a head search's fixed cost: reading its feature sets, the tuner's storage
REPORT_S = 6.0  # tables and figures of a small study
STAGE_SETUP_S = 1.0  # per stage and split seed: opening stores, reading the manifest


@dataclass
class Rates:
    """One backbone's measured throughputs (images per second)."""
    load_s: float
    extract: float
    extract_from: str
    train: dict = field(default_factory=dict)  # one-phase policy -> images/s of a training step
    evaluate: dict = field(default_factory=dict)  # one-phase policy -> images/s of an evaluation forward
    feature_dim: int = 0
    cut_channels: int = 0


def _timed(fn, *, warmup: int = 1, repeat: int = 1) -> float:
    """Mean seconds of one call of ``fn`` over ``repeat`` calls after ``warmup`` calls (oneDNN prepares its kernels
    for a new shape and the optimiser its state in the first calls: a training step settles after about three)."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _images(manifest, *, data_root, data_config, n: int):
    import torch

    from dataset.tensors import ImageViews

    rows = manifest.sample(n=min(n, len(manifest)), random_state=0)
    views = ImageViews.of_manifest(rows, data_root=data_root, views=[[0]] * len(rows), data_config=data_config,
                                   policy="none", seed=0)
    t0 = time.perf_counter()
    x = torch.stack([views[i][0][0] for i in range(len(rows))])
    return x, (time.perf_counter() - t0) / len(rows)


def calibrate(name: str, *, config: dict, manifest, data_root, device: str, stored_rate: float | None,
              n: int = 8) -> Rates:
    """Time ``name``'s extraction and each fine-tune policy's steps on this machine now."""
    import torch

    from extract.backbones import load_backbone
    from extract.engine import PassRunner, decode_workers, plan_layers
    from extract.stage import cut_policies
    from study.precision import resolve_precision

    cfg = config["extract"]
    t0 = time.perf_counter()
    bb = load_backbone(name, weights_file=cfg["weights"].get(name))
    load_s = time.perf_counter() - t0
    layers = plan_layers(name, cut_policies(config))
    runner = PassRunner(bb, layers=layers, device=device, precision=resolve_precision(cfg["precision"], device),
                        channels_last=cfg["channels_last"])
    x, decode_s = _images(manifest, data_root=data_root, data_config=bb.data_config, n=n)
    batch = x.repeat(max(1, min(cfg["batch_size"], 32) // len(x)), 1, 1, 1)  # the pass's batches are larger
    forward_s = _timed(lambda: runner(batch)) / len(batch)
    outputs = runner(x)
    # The pass decodes in its loader's worker processes while the model runs: the slower of the two sets the pace.
    workers = decode_workers(cfg["num_workers"], device=device)
    per_image = max(forward_s, decode_s / workers) if workers else forward_s + decode_s
    rates = Rates(load_s=load_s, extract=stored_rate or 1 / per_image,
                  extract_from="this store's earlier passes" if stored_rate else "decode + forward timed now",
                  feature_dim=int(outputs["pooled"].shape[1]))
    with torch.random.fork_rng(devices=[]):
        for policy in _one_phase(config):
            step = _policy_rates(bb, policy, outputs=outputs, images=x, config=config, device=device,
                                 decode_s=decode_s)
            if step is not None:
                rates.train[policy], rates.evaluate[policy] = step
    cut = outputs.get("last:1")
    rates.cut_channels = int(cut.shape[1]) if cut is not None else 0
    return rates


def _one_phase(config: dict) -> list[str]:
    from extract.blocks import parse_policy

    return list(dict.fromkeys(p for policy in config["finetune"]["policies"] for p in parse_policy(policy).phases))


def _policy_rates(bb, policy: str, *, outputs: dict, images, config: dict, device: str,
                  decode_s: float) -> tuple[float, float] | None:
    """(train, eval) images/s of ``policy``'s trained part on what it reads; None when it cannot split ``bb``."""
    import torch

    from finetune.model import PolicyNotApplicable, build_split_net
    from finetune.train import make_optimizer, to_training_layout, training_loss
    from study.precision import autocast

    hp = {**config["finetune"], "lr": 1e-3, "backbone_lr_mult": 0.1, "weight_decay": 1e-4}
    try:
        net = to_training_layout(build_split_net(bb, policy=policy, n_classes=10), device=device)
    except PolicyNotApplicable:
        return None
    cached = config["finetune"]["prefix_cache"] and net.prefix_names
    if policy == "head":
        inputs = torch.from_numpy(outputs["pooled"])
    elif cached:
        inputs = torch.from_numpy(outputs[policy]) if policy in outputs else None
        if inputs is None:
            return None
    else:
        inputs = images
    batch = inputs.repeat((max(1, hp["batch_size"] // len(inputs)) + 1,) + (1,) * (inputs.dim() - 1))
    batch = to_training_layout(batch[:hp["batch_size"]], device=device)
    opt = make_optimizer(net, hp)
    labels = torch.zeros(len(batch), dtype=torch.long, device=device)
    forward = net.forward_suffix if (policy == "head" or cached) else net

    def train_step():  # as finetune.train.Trainer steps: its precision's autocast, its memory layout
        net.train()
        with autocast(hp["precision"], device):
            out = forward(batch)
        loss = training_loss(out, labels, loss_fn=torch.nn.CrossEntropyLoss(), aux_weight=hp["aux_weight"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def eval_step():
        net.eval()
        with torch.no_grad(), autocast(hp["precision"], device):
            forward(batch)
    extra = 0.0 if cached or policy == "head" else decode_s * len(batch)  # the naive path decodes every step
    return (len(batch) / (_timed(train_step, warmup=3, repeat=3) + extra),
            len(batch) / (_timed(eval_step, warmup=1, repeat=2) + extra))


@functools.lru_cache(maxsize=64)
def head_fit_s(method: str, *, rows: int, dim: int, classes: int, max_iter: int) -> float:
    """Seconds to fit and score one head of ``method`` on features of this shape (synthetic: class means plus noise,
    at most 2,000 rows timed; more rows scale the time linearly)."""
    from classify.heads import make_pipeline

    rng = np.random.default_rng(0)
    n = min(rows, 2000)
    y = np.arange(n) % max(classes, 2)
    X = (rng.normal(size=(max(classes, 2), dim))[y] + rng.normal(scale=2.0, size=(n, dim))).astype(np.float32)
    point = {"power": 0.5, "norm": "standard", "pca": 0, "C": 1.0, "kernel": "linear", "k": 10, "metric": "cosine",
             "weights": "uniform"}
    t0 = time.perf_counter()
    make_pipeline(method, point, seed=0, head_cfg={"max_iter": max_iter, "tol": 1e-4}, n_rows=n).fit(X, y).predict(X)
    return (time.perf_counter() - t0) * rows / n


# ---------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Split:
    """One split seed's image counts."""
    train: int
    val: int
    test: int
    classes: int
    smallest_train: int  # images in the smallest class of train (the few-shot curve's largest k)

    @classmethod
    def of(cls, manifest) -> "Split":
        counts = manifest["split"].value_counts()
        train = manifest[manifest["split"] == "train"]
        return cls(train=int(counts.get("train", 0)), val=int(counts.get("val", 0)), test=int(counts.get("test", 0)),
                   classes=int(manifest["label"].nunique()),
                   smallest_train=int(train.groupby("label").size().min()) if len(train) else 0)


def _epochs(space: dict) -> float:
    epochs = space["epochs"]
    middle = float(np.mean(epochs)) if isinstance(epochs, list) else (epochs["low"] + epochs["high"]) / 2
    return EPOCH_SHARE * middle


def _curve_ks(config: dict, split: Split) -> list[int]:
    """The k of this seed's few-shot curve (each drawn ``fewshot.draws`` times, a search per arm and draw)."""
    from study.protocol import curve_on_seed

    return [k for k in config["fewshot"]["k"] if k <= split.smallest_train] if curve_on_seed(config) else []


def head_seconds(config: dict, split: Split, *, dim: int, feature_sets: list[str], views: int) -> float:
    """One head search: its trials, the chosen trial's refit (and its train-only twin), its few-shot curve."""
    cfg, trials = config["classify"], config["tune"]["trials"]
    rows = {"clean": split.train, "stages": split.train, "aug": split.train * (views + 1)}
    dims = {"clean": dim[0], "aug": dim[0], "stages": dim[1]}

    def fit(n: int, fs: str) -> float:
        return float(np.mean([head_fit_s(m, rows=max(n, 2), dim=dims[fs], classes=split.classes,
                                         max_iter=cfg["lr"]["max_iter"]) for m in cfg["heads"]]))
    trial = float(np.mean([fit(rows[fs], fs) for fs in feature_sets]))
    refit = 2 * float(np.mean([fit(rows[fs] + split.val, fs) for fs in feature_sets]))
    few = config["fewshot"]
    # Each (k, draw) is a search of its own: fewshot.trials trials on the draw, its refit on the draw alone.
    curve = sum(HEAD_SEARCH_SETUP_S + (few["trials"] + 1) * float(np.mean([fit(k * split.classes, fs)
                                                                           for fs in feature_sets]))
                for k in _curve_ks(config, split)) * few["draws"]
    return HEAD_SEARCH_SETUP_S + trials * trial + refit + curve


def finetune_seconds(config: dict, split: Split, rates: Rates) -> float:
    """One fine-tune search: its trials (the mean over the policies it chooses among), the refit, the test and val
    predictions, and its few-shot curve where this seed draws one."""
    from extract.blocks import parse_policy

    ft, tune_cfg = config["finetune"], config["tune"]
    eval_views = 2 if ft["tta"] == "hflip" else 1
    epochs = _epochs(tune_cfg["finetune"])

    def epoch_s(phase: str, n_train: int, n_eval: int) -> float:
        return EPOCH_SETUP_S + n_train / rates.train[phase] + n_eval * eval_views / rates.evaluate[phase]
    policies = [p for p in ft["policies"] if all(ph in rates.train for ph in parse_policy(p).phases)]
    if not policies:
        return 0.0
    phases = {p: parse_policy(p).phases for p in policies}
    trial = float(np.mean([sum(epochs * epoch_s(ph, split.train, split.val) for ph in phases[p]) for p in policies]))
    refit = float(np.mean([sum(epochs * epoch_s(ph, split.train + split.val, 0) for ph in phases[p])
                           for p in policies]))
    predict = float(np.mean([epoch_s(phases[p][-1], 0, split.test + split.val) for p in policies]))
    few = config["fewshot"]

    def few_trial(k: int) -> float:  # fewshot.trials trials on the draw (val read every epoch), its refit on it
        n = k * split.classes
        return float(np.mean([sum(epochs * epoch_s(ph, n, split.val) for ph in phases[p]) for p in policies]))
    curve = sum((few["trials"] + 1) * (few_trial(k) + TRIAL_SETUP_S) + predict * split.test
                / max(split.test + split.val, 1) for k in _curve_ks(config, split)) * few["draws"]
    return rates.load_s + tune_cfg["trials"] * (trial + TRIAL_SETUP_S) + refit + predict + curve
