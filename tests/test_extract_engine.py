"""The shared pass on small Caltech subsets (the tiny test network; the cut's float16 round trip also with the real
Lite0 weights, slow): one forward per (image, view) for
every layer, reuse across split seeds and class sets, cut activations equal to the full forward, kill -9
resume, two writers at once, torchrun/gloo sharding, damaged segments, the stage, bad images.

CPU kernels sum in an order that depends on the intra-op thread count, so runs that are compared
bit for bit all use one thread (torchrun gives each rank OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.images import load_rgb
from dataset.manifest import write_manifest
from dataset.tensors import ImageUnreadable
from dataset.transforms import eval_transform
from dataset.views import study_requests
from extract import backbones, engine
from extract.blocks import block_list
from extract.cache import load_feature_set
from extract.config import SCHEMA
from extract.engine import PassSettings, ensure_rows
from extract.store import Store, StoreDamaged
from study.context import StudyContext
from study.schema import validate
from tests.conftest import REPO, TEST_BACKBONE, make_tiny_manifest

pytestmark = pytest.mark.needs_data

SMALL = {"classes": ("accordion", "anchor"), "n_train": 2, "n_val": 1, "n_test": 1}  # 8 images -> 22 views
# fp32: these tests compare with fp32 references, which "auto" is not on a CPU with native bf16.
SETTINGS = PassSettings(precision="fp32", batch_size=2, num_workers=0, progress=False)
ARGS = {"backbone": TEST_BACKBONE, "policy": "light", "view_seed": 0}


class one_thread:
    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


class Forwards:
    """Counts images through the shared pass (patched in, like a user's profiler would)."""

    def __init__(self, monkeypatch):
        self.images = 0
        real = engine.PassRunner.__call__
        monkeypatch.setattr(engine.PassRunner, "__call__", lambda runner, x: self._count(x) or real(runner, x))

    def _count(self, x):
        self.images += len(x)


def _ensure(manifest, root, data_root, *, views=1, tta="hflip", policies=(), settings=SETTINGS, **kw):
    return ensure_rows(manifest=manifest, requests=study_requests(manifest, views=views, tta=tta), store_root=root,
                       policies=list(policies), settings=settings, data_root=data_root, **{**ARGS, **kw})


@pytest.fixture(scope="module")
def small(tmp_path_factory, data_root):
    return make_tiny_manifest(tmp_path_factory.mktemp("small") / "manifest.csv", **SMALL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small, data_root):
    """One uninterrupted single-thread pass over the small manifest: pooled + the last:1 cut."""
    root = tmp_path_factory.mktemp("ref")
    with one_thread():
        result = _ensure(small, root, data_root, policies=["last:1"])
    return result


def _rows(store: Store) -> dict:
    index = store.index()
    keys = sorted(index.rows)
    return dict(zip(keys, store.read(keys, index)))


def test_one_pass_fills_every_layer_once(reference, small):
    n, n_trainval = len(small), int((small["split"] != "test").sum())
    assert reference.computed == 2 * n + n_trainval  # clean + mirror of every image, 1 view of train/val
    assert reference.stored == {"pooled": reference.computed, "last:1": reference.computed}
    units = block_list(backbones.load_backbone(TEST_BACKBONE).model).units
    assert reference.layers[1].spec["name"] == f"after:{units[-2][0]}"  # the input of the last unit
    fs = load_feature_set(reference.stores["pooled"], manifest=small, views=1, tta="hflip", policy="light",
                          view_seed=0)
    dim = backbones.load_backbone(TEST_BACKBONE).feature_dim
    assert fs.features.shape == (reference.computed, dim) and np.isfinite(fs.features).all()
    assert fs.view.tolist() == [0] * n + [-1] * n + [1] * n_trainval
    assert fs.sample_id[:n].tolist() == small["sample_id"].tolist() and fs.extract_s > 0
    views, clean = fs.features[fs.view == 1], fs.features[:n][small["split"].to_numpy() != "test"]
    assert not np.allclose(views, clean, atol=1e-2 * np.abs(clean).max())  # 1% of the scale: another view


def test_pooled_rows_equal_the_backbone_and_the_mirror_its_flipped_input(reference, small, data_root):
    fs = load_feature_set(reference.stores["pooled"], manifest=small, views=1, tta="hflip", policy="light",
                          view_seed=0)
    bb = backbones.load_backbone(TEST_BACKBONE)
    clean = eval_transform(bb.data_config)(load_rgb(data_root / small["path"][0]))[None]
    with torch.inference_mode():
        expected = bb.model(clean).numpy()[0]
        mirrored = bb.model(torch.flip(clean, dims=[-1])).numpy()[0]
    np.testing.assert_allclose(fs.features[0], expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fs.features[len(small)], mirrored, rtol=0, atol=1e-4)


def test_rerun_computes_nothing_and_never_loads_the_model(reference, small, data_root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded or run on a store hit")

    monkeypatch.setattr(engine, "load_backbone", refuse)
    monkeypatch.setattr(engine, "PassRunner", refuse)
    segments = sorted(reference.stores["pooled"].segments())
    again = _ensure(small, reference.stores["pooled"].dir.parent, data_root, policies=["last:1"])
    assert again.computed == 0 and sorted(again.stores["pooled"].segments()) == segments


def test_two_single_thread_passes_are_bitwise_identical(reference, small, data_root, tmp_path):
    with one_thread():
        again = _ensure(small, tmp_path, data_root, policies=["last:1"])
    for layer in ("pooled", "last:1"):
        assert again.stores[layer].key == reference.stores[layer].key
        a, b = _rows(again.stores[layer]), _rows(reference.stores[layer])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_overlapped_writes_and_batched_float_store_the_same_bits_and_say_where_the_time_went(reference, small,
                                                                                              data_root, tmp_path):
    """The pass as before issue 24 (writes in the loop, float made per image in the workers) and as now: the same
    rows bit for bit, whatever the worker count; the breakdown of the pass's seconds is recorded."""
    before = PassSettings(**{**SETTINGS.__dict__, "overlap_writes": False, "float_in_batches": False,
                             "num_workers": 1, "segment_rows": 6})
    now = PassSettings(**{**SETTINGS.__dict__, "num_workers": 1, "segment_rows": 6})
    with one_thread():
        old = _ensure(small, tmp_path / "before", data_root, policies=["last:1"], settings=before)
        new = _ensure(small, tmp_path / "now", data_root, policies=["last:1"], settings=now)
    for layer in ("pooled", "last:1"):
        a, b = _rows(old.stores[layer]), _rows(new.stores[layer])
        c = _rows(reference.stores[layer])
        assert a.keys() == b.keys() == c.keys() and all(np.array_equal(a[k], b[k]) and np.array_equal(b[k], c[k])
                                                        for k in a)
    assert len(new.stores["pooled"].segments()) > 1  # several segments: the writer thread wrote while the pass ran
    t = new.timings
    assert {"wait_data", "forward", "buffer", "digest", "write", "wait_write"} <= set(t) and t["forward"] > 0
    assert t["wait_data"] + t["forward"] + t["buffer"] + t["wait_write"] <= new.seconds


def _resplit(manifest, *, seed: int):
    """The same images with another split: per class, a seeded permutation of the split labels."""
    df = manifest.copy()
    rng = np.random.default_rng(seed)
    for _, idx in df.groupby("class_name").groups.items():
        df.loc[idx, "split"] = rng.permutation(df.loc[idx, "split"].to_numpy())
    return df


def test_a_second_split_seed_computes_only_views_of_images_new_to_train(reference, small, data_root, tmp_path,
                                                                          monkeypatch):
    root = tmp_path / "store"
    shutil.copytree(reference.stores["pooled"].dir.parent, root)
    other = _resplit(small, seed=3)
    assert (other["split"] != small["split"]).any()
    newly = other[(other["split"] != "test") & (small["split"] == "test")]
    forwards = Forwards(monkeypatch)
    result = _ensure(other, root, data_root, policies=["last:1"])
    assert forwards.images == result.computed == len(newly)  # their augmented view, nothing clean or mirrored
    fs = load_feature_set(result.stores["pooled"], manifest=other, views=1, tta="hflip", policy="light", view_seed=0)
    assert fs.features.shape[0] == 2 * len(other) + int((other["split"] != "test").sum())


def test_a_dropped_class_computes_nothing_and_an_added_one_only_its_images(reference, small, data_root, tmp_path,
                                                                            monkeypatch):
    root = tmp_path / "store"
    shutil.copytree(reference.stores["pooled"].dir.parent, root)
    forwards = Forwards(monkeypatch)
    fewer = small[small["class_name"] == "accordion"].reset_index(drop=True)
    assert _ensure(fewer, root, data_root, policies=["last:1"]).computed == 0
    more = make_tiny_manifest(tmp_path / "more.csv", **{**SMALL, "classes": ("accordion", "anchor", "crab")})
    added = more[more["class_name"] == "crab"]
    result = _ensure(more, root, data_root, policies=["last:1"])
    assert forwards.images == result.computed == 2 * len(added) + int((added["split"] != "test").sum())


@pytest.mark.parametrize("backbone", [TEST_BACKBONE, pytest.param("efficientnet_lite0", marks=pytest.mark.slow)])
@pytest.mark.parametrize("policy", ["last:1", "last:2"])
def test_logits_from_the_stored_cut_equal_the_full_forward(policy, backbone, small, data_root, tmp_path):
    """The suffix run on stored (float16) activations gives the full network's logits within float16's tolerance."""
    from finetune.inputs import load_prefix
    from finetune.model import build_split_net

    result = _ensure(small, tmp_path, data_root, views=0, tta="none", policies=[policy], backbone=backbone)
    cache = load_prefix(result.stores[policy], manifest=small, views=0, tta="none", policy="light", view_seed=0)
    bb = backbones.load_backbone(backbone)
    net = build_split_net(bb, policy=policy, n_classes=2, seed=0).eval()
    train = small[small["split"] == "train"]
    images = torch.stack([eval_transform(bb.data_config)(load_rgb(data_root / p)) for p in train["path"]])
    with torch.inference_mode():
        naive = net(images)
        cached = net.forward_suffix(cache.splits["train"].acts[:, 0].float())
    assert cache.splits["train"].acts.dtype == torch.float16
    # float16's 11-bit mantissa: within 0.5% of the logits' scale (the tiny network's logits are ~100x smaller)
    torch.testing.assert_close(cached, naive, rtol=0, atol=5e-3 * max(float(naive.abs().max()), 1e-3))
    assert not torch.allclose(naive[0], naive[1], atol=1e-2 * float(naive.abs().max()))  # two images differ


def _cli(manifest: Path, root: Path, data_root: Path, *extra: str) -> list[str]:
    return ["-m", "extract.engine", "--manifest", str(manifest), "--store", str(root), "--data-root", str(data_root),
            "--views", "1", "--tta", "hflip", "--policy", "light", "--policies", "last:1", "--batch-size", "2",
            "--num-workers", "0", "--no-progress", "--precision", "fp32", "--backbone", TEST_BACKBONE, *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_killed_and_rerun_equals_uninterrupted(reference, small, data_root, tmp_path, monkeypatch):
    manifest = tmp_path / "manifest.csv"
    write_manifest(small, manifest)
    proc = subprocess.Popen([sys.executable, *_cli(manifest, tmp_path, data_root, "--segment-rows", "2")], cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(list(tmp_path.glob("*/seg-*.h5"))) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pooled = Store(tmp_path, reference.stores["pooled"].spec)
    done = len(pooled.index().rows)
    assert 2 <= done < reference.computed, "the kill should land mid-pass"
    forwards = Forwards(monkeypatch)
    with one_thread():
        resumed = _ensure(small, tmp_path, data_root, policies=["last:1"])
    assert forwards.images < reference.computed  # the stored batches were not computed again
    for layer in ("pooled", "last:1"):
        a, b = _rows(resumed.stores[layer]), _rows(reference.stores[layer])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), layer
    assert not list(tmp_path.glob("*/.*.tmp"))


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_two_studies_at_once_share_the_rows(reference, small, data_root, tmp_path):
    manifest = tmp_path / "manifest.csv"
    write_manifest(small, manifest)
    procs = [subprocess.Popen([sys.executable, *_cli(manifest, tmp_path / "store", data_root)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    computed = sorted(int(o[0].split("computed=")[1].split()[0]) for o in outs)
    assert computed == [0, reference.computed]  # one computed, the other waited and found the rows
    pooled = Store(tmp_path / "store", reference.stores["pooled"].spec)
    assert sum(pooled.index().sizes.values()) == reference.computed  # no row stored twice
    a, b = _rows(pooled), _rows(reference.stores["pooled"])
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_two_gloo_processes_equal_one(reference, small, data_root, tmp_path):
    manifest = tmp_path / "manifest.csv"
    write_manifest(small, manifest)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_cli(manifest, tmp_path, data_root)]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    segments = list(tmp_path.glob("*/seg-*.h5"))
    assert len(segments) >= 4  # two layers x both ranks wrote their own segments
    for layer in ("pooled", "last:1"):
        a, b = _rows(Store(tmp_path, reference.stores[layer].spec)), _rows(reference.stores[layer])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), layer


def test_a_damaged_segment_is_named_and_rebuild_recomputes_it(reference, small, data_root, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(reference.stores["pooled"].dir.parent, root)
    store = Store(root, reference.stores["pooled"].spec)
    seg = max(store.segments(), key=lambda p: p.stat().st_size)
    raw = bytearray(seg.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 256] = bytes(256)
    seg.write_bytes(bytes(raw))
    with pytest.raises(StoreDamaged, match=seg.name):
        load_feature_set(store, manifest=small, views=1, tta="hflip", policy="light", view_seed=0)
    with one_thread():
        rebuilt = _ensure(small, root, data_root, policies=["last:1"], rebuild=True)
    assert rebuilt.computed == reference.computed
    a, b = _rows(rebuilt.stores["pooled"]), _rows(reference.stores["pooled"])
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_rebuild_recomputes_an_entry_once_per_run_whatever_asks_again(reference, small, data_root, tmp_path,
                                                                       monkeypatch):
    """--rebuild-cache: the first caller of a run wipes and recomputes; later callers (other stages, other split
    seeds) add to the fresh entry instead of wiping it again."""
    root = tmp_path / "store"
    shutil.copytree(reference.stores["pooled"].dir.parent, root)
    monkeypatch.setattr(engine, "_REBUILT", set())  # a new run
    first = _ensure(small, root, data_root, policies=["last:1"], rebuild=True)
    assert first.computed == reference.computed
    other = _resplit(small, seed=3)
    again = _ensure(other, root, data_root, policies=["last:1"], rebuild=True)
    newly = other[(other["split"] != "test") & (small["split"] == "test")]
    assert again.computed == len(newly)  # only the other split's new views: the first seed's rows were kept
    assert sum(Store(root, reference.stores["pooled"].spec).index().sizes.values()) == reference.computed + len(newly)


def test_a_killed_writers_temporary_segment_is_removed(reference, small, data_root, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(reference.stores["pooled"].dir.parent, root)
    stale = Store(root, reference.stores["pooled"].spec).dir / ".seg-0123.h5.abcd.tmp"
    stale.write_bytes(b"half a segment")
    _ensure(small, root, data_root, policies=["last:1"])
    assert not stale.exists()


def test_a_new_entry_names_what_differs_from_the_stored_one(reference, small, data_root, tmp_path, caplog):
    root = tmp_path / "store"
    shutil.copytree(reference.stores["pooled"].dir.parent, root)
    with caplog.at_level("INFO", logger="extract.engine"):
        _ensure(small[small["split"] == "test"].reset_index(drop=True), root, data_root, tta="none",
                settings=PassSettings(**{**SETTINGS.__dict__, "storage_dtype": "float16"}))
    assert "differs in storage_dtype: now 'float16', stored 'float32'" in caplog.text


def test_unreadable_image_names_the_sample(small, data_root, tmp_path):
    df = small.copy()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    df.loc[0, "path"] = str(bad)
    df.loc[0, "sha256"] = "0" * 64
    with pytest.raises(ImageUnreadable, match=rf"sample '{df.loc[0, 'sample_id']}' .*broken.jpg.*cannot be read"):
        _ensure(df, tmp_path / "s", data_root, settings=PassSettings(**{**SETTINGS.__dict__, "num_workers": 1}))
    assert not list((tmp_path / "s").glob("*/seg-*.h5"))


def _ctx(out: Path, data_root: Path, run: Path, extract: dict, finetune: dict | None = None) -> StudyContext:
    from finetune.config import SCHEMA as FT_SCHEMA

    config = {"seed": 0, "extract": validate(extract, SCHEMA, prefix="extract"),
              "finetune": validate(finetune or {"policies": ["head"]}, FT_SCHEMA, prefix="finetune")}
    return StudyContext(config=config, data_root=data_root, out_dir=out, run_dir=run, device="cpu")


def test_stage_writes_features_json_and_skips_unavailable_weights(reference, small, data_root, tmp_path,
                                                                 monkeypatch):
    from extract.stage import run

    monkeypatch.setenv(backbones.OFFLINE_ENV, "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    out = tmp_path / "out"
    shutil.copytree(reference.stores["pooled"].dir.parent, out / "store")
    write_manifest(small, out / "dataset" / "manifest.csv")
    ctx = _ctx(out, data_root, tmp_path / "run", {"backbones": [TEST_BACKBONE, "resnet50"], "views": 1,
                                                    "batch_size": 2, "num_workers": 0, "precision": "fp32"},
               {"policies": ["head", "last:1"]})
    run(ctx)
    (entry,) = json.loads((ctx.run_dir / "features.json").read_text())
    assert entry["computed"] == 0 and entry["store"] == f"store/{reference.stores['pooled'].key}"
    assert set(entry["layers"]) == {"pooled", "last:1"}
    skips = [json.loads(line) for line in (ctx.run_dir / "skipped.jsonl").read_text().splitlines()]
    assert len(skips) == 1 and skips[0]["stage"] == "extract" and "resnet50-11ad3fa6.pth" in skips[0]["fix"]


def test_stage_rejects_unknown_backbone_before_work(data_root, tmp_path):
    from extract.stage import run

    ctx = _ctx(tmp_path, data_root, tmp_path / "run", {"backbones": ["efficientnet_lite0", "resnet51"]})
    with pytest.raises(ValueError, match="extract.backbones: unknown backbone 'resnet51'"):
        run(ctx)
    assert not (ctx.run_dir / "features.json").exists() and not (tmp_path / "store").exists()


def test_auto_decode_workers_are_one_for_a_cpu_forward_and_more_for_a_gpu(monkeypatch):
    """extract.num_workers = "auto" leaves the cores to a CPU forward and feeds a GPU from all but one core."""
    from extract.engine import decode_workers
    from extract.stage import pass_settings
    from pipeline.config import load_config

    assert decode_workers("auto", device="cpu") == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert decode_workers("auto", device="cuda") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on one machine share its cores
    assert decode_workers("auto", device="cuda") == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # a container's limit, not the host's 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert decode_workers("auto", device="cuda") == 1
    assert decode_workers(3, device="cpu") == decode_workers(3, device="cuda") == 3
    assert decode_workers(0, device="cpu") == 0
    cfg = load_config("configs/quick.toml")["extract"]
    assert cfg["num_workers"] == "auto" and pass_settings(cfg, device="cpu").num_workers == 1
