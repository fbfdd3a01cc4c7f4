"""Fine-tuning on a tiny real Caltech subset: with the real Lite0 weights it learns (slow); with the tiny test network
the frozen part does not move, the prefix cache reproduces the full forward, a run resumes, rows are cached."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from dataset.manifest import read_manifest
from dataset.views import study_requests
from extract.engine import PassSettings, ensure_rows, store_keys
from finetune.inputs import StoreAccess, load_prefix
from finetune.model import build_split_net
from finetune.train import CachedSource, ImageSource, Trainer
from pipeline.config import load_config
from study.results import check_row
from tests.conftest import DATA_ROOT, TEST_BACKBONE
from tests.finetune_fixtures import recipe, search

# The same search as tests/finetune_fixtures.py's, as --set overrides of a whole study config.
TUNE = ("tune.trials=1", "tune.startup_trials=1", 'tune.sampler="random"', 'tune.pruner="none"', "tune.finetune.lr=[3e-3]",
        "tune.finetune.backbone_lr_mult=[0.1]", "tune.finetune.weight_decay=[0.01]",
        "tune.finetune.label_smoothing=[0.1]", "tune.finetune.epochs=[3]")


@pytest.fixture(scope="module")
def hp():
    hp = recipe()
    # fp32: cached-vs-naive and feature-cache comparisons need it on CPUs where "auto" is bf16.
    # The recipe a Trainer takes directly; the searches below draw the same one (tests/finetune_fixtures.py FIXED).
    hp.update(epochs=3, views=1, batch_size=8, lr=3e-3, backbone_lr_mult=0.1, weight_decay=0.01, label_smoothing=0.1,
              n_boot=20, num_workers=0, warmup_epochs=1, precision="fp32")
    return hp


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    settings = PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False)
    return {"finetune_dir": root / "finetune", "store": StoreAccess(root=root / "store", settings=settings)}


def _runs(backbone, hp, dirs, tiny_manifest, data_root):
    out = {}
    for policy in ("head", "last:1"):
        out[policy] = search(backbone=backbone, policies=policy, manifest_path=tiny_manifest, data_root=data_root,
                             hp=hp, seed=0, device="cpu", **dirs).rows
    return out


@pytest.fixture(scope="module")
def runs(tiny_backbone, hp, dirs, tiny_manifest, data_root):
    return _runs(tiny_backbone, hp, dirs, tiny_manifest, data_root)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["head", "last:1"])
def test_finetuning_learns(lite0, hp, tiny_manifest, data_root, tmp_path_factory, policy):
    settings = PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False)
    root = tmp_path_factory.mktemp("ft-real")
    dirs = {"finetune_dir": root / "finetune", "store": StoreAccess(root=root / "store", settings=settings)}
    (row,) = search(backbone=lite0, policies=policy, manifest_path=tiny_manifest, data_root=data_root, hp=hp, seed=0,
                    device="cpu", **dirs).rows
    check_row(row)
    assert row.method == f"ft:{policy}" and row.kind == "finetune" and row.feature_set == "light"
    assert max(h["val_mean_per_class"] for h in row.selection.curve) >= 0.75  # chance is 0.25
    assert row.metrics.mean_per_class >= 0.5
    assert row.n_train == 24 and row.n_val == 8 and row.n_test == 16 == len(row.test_pred)
    assert 0 < row.trainable_params < row.total_params


def test_rerun_reappends_cached_rows_without_training(runs, tiny_backbone, hp, dirs, tiny_manifest, data_root):
    epochs = []
    again = search(backbone=tiny_backbone, policies="last:1", manifest_path=tiny_manifest, data_root=data_root, hp=hp,
                   seed=0, device="cpu", on_epoch_end=lambda e, s: epochs.append(e), **dirs).rows
    assert again == runs["last:1"] and epochs == []


def _store_entry(tiny_backbone, hp, dirs, manifest, policy):
    access = dirs["store"]
    result = ensure_rows(manifest=manifest, backbone=tiny_backbone.name, policy=hp["augment"], view_seed=0,
                         requests=study_requests(manifest, views=hp["views"], tta=hp["tta"]), store_root=access.root,
                         policies=[] if policy == "head" else [policy], settings=access.settings,
                         data_root=DATA_ROOT)
    return result, result.stores["pooled" if policy == "head" else policy]


def _last1_cache(tiny_backbone, hp, dirs, manifest_path):
    manifest = read_manifest(manifest_path)
    net = build_split_net(tiny_backbone, policy="last:1", n_classes=4)
    _, entry = _store_entry(tiny_backbone, hp, dirs, manifest, "last:1")
    return net, manifest, load_prefix(entry, manifest=manifest, views=hp["views"], tta=hp["tta"], policy=hp["augment"],
                                      view_seed=0)


@pytest.mark.parametrize("which", ["tiny_backbone", pytest.param("lite0", marks=pytest.mark.slow)])
def test_prefix_cache_path_gives_the_naive_logits(which, hp, dirs, tiny_manifest, data_root, tmp_path, request):
    """With tta = "hflip" both paths average each val image's logits with its mirror's (float16 stored cut: also
    with the real Lite0's activations, whose scale the tiny network's are not)."""
    assert hp["tta"] == "hflip"
    tiny_backbone = request.getfixturevalue(which)
    net, manifest, cache = _last1_cache(tiny_backbone, hp, dirs, tiny_manifest)
    assert cache.splits["train"].acts.dtype == torch.float16 and cache.splits["train"].acts.shape[1] == 2
    assert cache.splits["val"].acts.shape[1] == cache.splits["test"].acts.shape[1] == 2  # view 0 + mirror
    trainer = Trainer(net=net, hp=hp, seed=0, device="cpu", ckpt_dir=tmp_path, run_key="x")
    val = manifest[manifest["split"] == "val"].reset_index(drop=True)
    naive = trainer.predict(ImageSource(rows=val, data_root=data_root, data_config=tiny_backbone.data_config,
                                        policy="light", num_workers=0, tta="hflip"))
    cached = trainer.predict(CachedSource(cache.splits["val"].acts, cache.splits["val"].labels, eval_views=2))
    scale = float(abs(naive).max())
    torch.testing.assert_close(torch.from_numpy(cached), torch.from_numpy(naive), rtol=0, atol=5e-3 * scale)
    assert (cached.argmax(1) == naive.argmax(1)).all()


def test_test_time_views_average_the_logits_of_each_view(runs, tiny_backbone, hp, dirs, tiny_manifest, tmp_path):
    net, _, cache = _last1_cache(tiny_backbone, hp, dirs, tiny_manifest)
    acts, labels = cache.splits["test"].acts, cache.splits["test"].labels
    trainer = Trainer(net=net, hp=hp, seed=0, device="cpu", ckpt_dir=tmp_path, run_key="x")
    both = trainer.predict(CachedSource(acts, labels, eval_views=2))
    clean = trainer.predict(CachedSource(acts[:, :1], labels))
    mirror = trainer.predict(CachedSource(acts[:, 1:], labels))
    assert not torch.equal(torch.from_numpy(clean), torch.from_numpy(mirror))  # the mirror is another view
    torch.testing.assert_close(torch.from_numpy(both), torch.from_numpy((clean + mirror) / 2))
    with pytest.raises(ValueError, match="eval_views=3; allowed: 1..2"):
        CachedSource(acts, labels, eval_views=3)


def test_frozen_parameters_and_bn_buffers_do_not_move(tiny_backbone, hp, tiny_manifest, data_root, tmp_path):
    """The naive path runs the frozen prefix in every training step: its weights and BN statistics must stay put."""
    net = build_split_net(tiny_backbone, policy="last:1", n_classes=4)
    prefix_before = {k: v.clone() for k, v in net.prefix.state_dict().items()}
    suffix_before = {k: v.clone() for k, v in net.trainable_state().items()}
    manifest = read_manifest(tiny_manifest)
    rows = manifest[manifest["split"] == "train"].iloc[::3].reset_index(drop=True)  # 8 images
    source = ImageSource(rows=rows, data_root=data_root, data_config=tiny_backbone.data_config, policy="light",
                         num_workers=0)
    trainer = Trainer(net=net, hp={**hp, "epochs": 1}, seed=0, device="cpu", ckpt_dir=tmp_path, run_key="x")
    trainer._bind(from_prefix=False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer.train_epoch(source, epoch=0, optimizer=opt, scheduler=sched, scaler=torch.amp.GradScaler(enabled=False))
    for k, v in net.prefix.state_dict().items():
        assert torch.equal(v, prefix_before[k]), k
    moved = [k for k, v in net.trainable_state().items() if not torch.equal(v, suffix_before[k])]
    assert any("running_mean" in k for k in moved) and any("head" in k for k in moved)


def _fit(net, hp, cache, ckpt_dir, on_epoch_end=None):
    s = cache.splits
    trainer = Trainer(net=net, hp=hp, seed=0, device="cpu", ckpt_dir=ckpt_dir, run_key="resume-test")
    return trainer.fit(CachedSource(s["train"].acts, s["train"].labels), CachedSource(s["val"].acts, s["val"].labels),
                       on_epoch_end=on_epoch_end)


def test_interrupted_run_resumes_to_the_uninterrupted_result(runs, tiny_backbone, hp, dirs, tiny_manifest, tmp_path):
    hp = {**hp, "patience": 10}
    net, _, cache = _last1_cache(tiny_backbone, hp, dirs, tiny_manifest)
    straight = _fit(net, hp, cache, tmp_path / "straight")
    straight_state = {k: v.clone() for k, v in net.trainable_state().items()}

    def interrupt(epoch, stats):
        if epoch == 0:
            raise KeyboardInterrupt

    net, _, _ = _last1_cache(tiny_backbone, hp, dirs, tiny_manifest)
    with pytest.raises(KeyboardInterrupt):
        _fit(net, hp, cache, tmp_path / "resumed", on_epoch_end=interrupt)
    net, _, _ = _last1_cache(tiny_backbone, hp, dirs, tiny_manifest)  # a fresh process would start from scratch weights
    seen = []
    resumed = _fit(net, hp, cache, tmp_path / "resumed", on_epoch_end=lambda e, s: seen.append(e))
    assert resumed.resumed_from == 0 and seen == [1, 2]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    assert resumed.best_epoch == straight.best_epoch
    for k, v in net.trainable_state().items():
        assert torch.equal(v, straight_state[k]), k


def test_stage_reappends_cached_rows_and_records_unloadable_backbones(runs, dirs, tiny_manifest, data_root, tmp_path):
    from finetune import stage
    from study.context import StudyContext
    from study.results import read_results, read_skips

    out_dir = dirs["finetune_dir"].parent  # the layout StudyContext expects: finetune/, store/, dataset/
    (out_dir / "dataset").mkdir(exist_ok=True)
    (out_dir / "dataset" / "manifest.csv").write_bytes(tiny_manifest.read_bytes())
    config = load_config(overrides=[
        f'extract.backbones=["{TEST_BACKBONE}", "resnet18"]', 'extract.weights={resnet18="/nowhere/r18.pth"}',
        'finetune.policies=["head"]', "finetune.views=1", "finetune.batch_size=8", "finetune.n_boot=20",
        "finetune.num_workers=0", 'finetune.precision="fp32"', 'extract.precision="fp32"', "fewshot.k=[]",
        "finetune.backbones=[]", "finetune.ensembles=[]", *TUNE])
    ctx = StudyContext(config=config, data_root=data_root, out_dir=out_dir, run_dir=tmp_path / "run", device="cpu")
    stage.run(ctx)
    (row,) = read_results(ctx.results_path)
    assert row.replace(index=-1) == runs["head"][0]
    (skip,) = read_skips(ctx.run_dir)
    assert skip["what"] == "resnet18" and "/nowhere/r18.pth" in skip["fix"]


def test_head_policy_reads_the_rows_the_heads_read_and_makes_no_pass(runs, tiny_backbone, hp, dirs, tiny_manifest,
                                                                      monkeypatch):
    """ft:head's frozen prefix is the pooled feature: it reads the heads' store entry, and no forward runs again."""
    from extract import engine
    from extract.cache import load_feature_set

    manifest = read_manifest(tiny_manifest)
    calls = []
    monkeypatch.setattr(engine.PassRunner, "__call__", lambda *a: calls.append(1))
    result, pooled = _store_entry(tiny_backbone, hp, dirs, manifest, "head")
    assert result.computed == 0 and calls == []
    fs = load_feature_set(pooled, manifest=manifest, views=hp["views"], tta=hp["tta"], policy=hp["augment"],
                          view_seed=0)
    cache = load_prefix(pooled, manifest=manifest, views=hp["views"], tta=hp["tta"], policy=hp["augment"], view_seed=0)
    assert cache.path == fs.path
    # The run's inputs are exactly the pooled rows: train and val images' views 0..V, val and test's view 0 + mirror.
    spec = json.loads((dirs["finetune_dir"] / runs["head"][0].keys["run_key"] / "spec.json").read_text())
    split = manifest["split"]
    order = [(m, v) for s in ("train", "val") for m in np.flatnonzero(split == s) for v in (0, 1)]
    order += [(m, v) for s in ("val", "test") for m in np.flatnonzero(split == s) for v in (0, -1)]
    keys = store_keys(manifest, order, policy=hp["augment"], view_seed=0)
    assert spec["inputs"] == {"head": pooled.identity(keys)}
    test = (fs.split == "test") & (fs.view == 0)
    assert fs.sample_id[test].tolist() == cache.splits["test"].sample_id
    assert torch.equal(cache.splits["test"].acts[:, 0], torch.from_numpy(fs.features[test]))  # the same bytes
    assert cache.build_s > 0  # the pass's share is charged to the fine-tune's cost


def test_changed_store_bytes_retrain_what_read_them(runs, tiny_backbone, hp, dirs, tiny_manifest, data_root, tmp_path):
    """The run key holds the content identity of the rows read: the same rows with other bytes retrain."""
    from extract.store import Store

    manifest = read_manifest(tiny_manifest)
    _, source = _store_entry(tiny_backbone, hp, dirs, manifest, "head")
    index = source.index()
    keys = sorted(index.rows)
    data = source.read(keys, index)
    data[3, 5] += 0.5  # one value of one row
    copy = Store(tmp_path / "store", source.spec)
    copy.create()
    copy.write_segment(keys, data, compute_s=1.0)
    assert copy.key == source.key  # same entry, same row keys: only the bytes differ
    epochs = []
    rows = search(backbone=tiny_backbone, policies="head", manifest_path=tiny_manifest, data_root=data_root, hp=hp,
                  seed=0,
                  device="cpu", finetune_dir=dirs["finetune_dir"],
                  store=dataclasses.replace(dirs["store"], root=tmp_path / "store"),
                  on_epoch_end=lambda e, s: epochs.append(e)).rows
    assert epochs and rows[0].keys["run_key"] != runs["head"][0].keys["run_key"]


def test_stage_draws_no_fewshot_curve_on_a_later_split_seed_with_split_seeds_first(runs, dirs, tiny_manifest,
                                                                                   data_root, tmp_path, monkeypatch):
    import finetune.fewshot
    from finetune import stage
    from study.context import StudyContext
    from study.results import read_results

    out_dir = dirs["finetune_dir"].parent
    (out_dir / "dataset").mkdir(exist_ok=True)
    (out_dir / "dataset" / "manifest.csv").write_bytes(tiny_manifest.read_bytes())
    called = []
    monkeypatch.setattr(finetune.fewshot, "run_fewshot", lambda **kw: called.append(kw["seed"]) or [])
    for split_seeds, expected in (("first", []), ("all", [0])):
        config = load_config(overrides=[
            f'extract.backbones=["{TEST_BACKBONE}"]', 'finetune.policies=["head"]', "finetune.views=1",
            "finetune.batch_size=8", "finetune.n_boot=20", "finetune.num_workers=0", 'finetune.precision="fp32"',
            'extract.precision="fp32"', "fewshot.k=[1]", *TUNE,
            f'fewshot.split_seeds="{split_seeds}"', "seeds=[5, 0]", "seed=0"])
        called.clear()
        ctx = StudyContext(config=config, data_root=data_root, out_dir=out_dir, run_dir=tmp_path / split_seeds,
                           device="cpu")
        stage.run(ctx)  # split seed 0 is the second of seeds = [5, 0]
        assert called == expected
        assert [r.replace(index=-1) for r in read_results(ctx.results_path)] == runs["head"]


def test_resume_only_returns_a_finished_run_and_refuses_to_train(tmp_path, monkeypatch):
    """What finetune.experiment.run_predictions relies on: a finished fit (here one that stopped early) comes back
    as it was without an epoch trained; one that would train raises NotFinished; the same for fit_fixed."""
    from extract.backbones import load_backbone
    from finetune.train import NotFinished
    from tests.test_finetune_ddp import CLASSES, _data

    hp = recipe()
    hp.update(epochs=8, patience=1, batch_size=8, lr=1e-2, warmup_epochs=0, precision="fp32")
    train, val = _data()

    def trainer(ckpt):
        net = build_split_net(load_backbone("resnet18", pretrained=False), policy="head", n_classes=CLASSES, seed=0)
        return Trainer(net=net, hp=hp, seed=0, device="cpu", ckpt_dir=tmp_path / ckpt, run_key="r")

    first = trainer("a")
    done = first.fit(train, val)
    assert done.stopped_early and done.epochs_run < hp["epochs"]  # the patience branch is the one exercised
    trained = []
    real = Trainer.train_epoch
    monkeypatch.setattr(Trainer, "train_epoch", lambda *a, **k: trained.append(1) or real(*a, **k))
    again = trainer("a")
    result = again.fit(train, val, resume_only=True)
    assert trained == [] and result.best_epoch == done.best_epoch
    for key, value in first.net.trainable_state().items():
        assert torch.equal(again.net.trainable_state()[key], value), key
    with pytest.raises(NotFinished, match="not a finished fine-tune"):
        trainer("b").fit(train, val, resume_only=True)
    monkeypatch.setattr(Trainer, "train_epoch", real)
    trainer("c").fit_fixed(train, epochs=2)
    monkeypatch.setattr(Trainer, "train_epoch", lambda *a, **k: trained.append(1) or real(*a, **k))
    trainer("c").fit_fixed(train, epochs=2, resume_only=True)
    assert trained == []
    with pytest.raises(NotFinished):
        trainer("c").fit_fixed(train, epochs=3, resume_only=True)


def test_a_trainer_keeps_the_layout_its_device_trains_fastest_in(tiny_backbone, hp, tmp_path):
    """Channels-last on CUDA only (on a CPU it measured no gain, benchmarks/finetune_layout.py): a CPU trainer's net
    and batches stay contiguous, whatever their rank."""
    from finetune.train import to_training_layout, trains_channels_last

    assert trains_channels_last("cuda") and trains_channels_last("cuda:1")
    assert not trains_channels_last("cpu") and not trains_channels_last("mps")
    net = Trainer(net=build_split_net(tiny_backbone, policy="last:1", n_classes=3), hp=hp, seed=0, device="cpu",
                  ckpt_dir=tmp_path, run_key="k").net
    # Only a kernel with several input channels and taps tells the layouts apart (a depthwise or 1x1 one is both).
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)
             and m.weight.shape[1] > 1 and m.kernel_size != (1, 1)]
    assert convs and not any(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    for batch in (torch.randn(2, 8, 5, 5), torch.randn(4, 6), torch.randn(4, 6, 3)):
        assert to_training_layout(batch, device="cpu").is_contiguous()


def test_training_and_prediction_hand_freed_heap_back_every_few_batches(tiny_backbone, tmp_path, monkeypatch):
    """The freed pages a loop's per-batch buffers leave in glibc's heap are trimmed every ``heap.EVERY`` batches of
    a training epoch and of a prediction (the memory a loop holds then follows its live tensors, study/heap.py);
    trimming is safe to call where the C library has no ``malloc_trim``."""
    import ctypes
    import platform

    from finetune.train import CachedSource
    from study import heap

    if platform.libc_ver()[0] == "glibc":
        assert heap._malloc_trim.__wrapped__() is not None
    heap.trim()  # the real one, once: no error on this platform
    # A C library that cannot be loaded (macOS, Windows) or has no malloc_trim (musl): nothing to do.
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    assert heap._malloc_trim.__wrapped__() is None
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())
    assert heap._malloc_trim.__wrapped__() is None
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    heap.trim()
    with pytest.raises(ValueError, match="every=0"):
        list(heap.trimmed([1], every=0))
    calls = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append(1))
    net = build_split_net(tiny_backbone, policy="head", n_classes=3)
    hp = {**recipe(), "batch_size": 2, "precision": "fp32", "label_smoothing": 0.0, "lr": 1e-3, "backbone_lr_mult": 0.1,
          "weight_decay": 0.0, "warmup_epochs": 0, "epochs": 1}
    trainer = Trainer(net=net, hp=hp, seed=0, device="cpu", ckpt_dir=tmp_path, run_key="k")
    n, dim = 70, tiny_backbone.feature_dim
    source = CachedSource(torch.randn(n, 1, dim), torch.arange(n) % 3)
    trainer.predict(source)  # batches of 64: 2 batches, the first trimmed
    assert len(calls) == 1
    calls.clear()
    trainer._bind(from_prefix=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer.train_epoch(source, epoch=0, optimizer=optimizer, scheduler=scheduler,
                        scaler=torch.amp.GradScaler(enabled=False))
    assert len(calls) == -(-35 // heap.EVERY)  # 35 batches of 2: trimmed before batches 0, 16 and 32
