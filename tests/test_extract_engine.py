"""Extraction with the real Lite0 weights on small Caltech subsets: shapes, determinism, cache hits,
invalidation, kill -9 + resume, torchrun/gloo sharding, the stage, bad images.

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

import h5py
import numpy as np
import pytest
import torch

from dataset.images import load_rgb
from dataset.manifest import read_manifest, write_manifest
from dataset.transforms import eval_transform
from extract import backbones, cache, engine
from extract.cache import CacheMismatch, check_cache, load_features
from extract.config import SCHEMA
from extract.engine import ImageUnreadable, extract_features, plan_extraction
from study.context import StudyContext
from study.schema import validate
from tests.conftest import REPO, make_tiny_manifest

SMALL = {"classes": ("accordion", "anchor"), "n_train": 2, "n_val": 1, "n_test": 1}  # 8 images -> 14 rows
# fp32: these tests compare with fp32 references, which "auto" is not on a CPU with native bf16.
SMALL_ARGS = {"backbone": "efficientnet_lite0", "views": 1, "policy": "light", "seed": 0, "batch_size": 2,
              "num_workers": 0, "progress": False, "precision": "fp32"}
TINY_ARGS = {"backbone": "efficientnet_lite0", "views": 1, "policy": "light", "seed": 0, "batch_size": 16,
             "num_workers": 1, "progress": False, "precision": "fp32"}


class one_thread:
    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def _cli_args(manifest: Path, cache_dir: Path, data_root: Path) -> list[str]:
    return ["-m", "extract.engine", "--manifest", str(manifest), "--cache-dir", str(cache_dir),
            "--data-root", str(data_root), "--views", "1", "--policy", "light", "--seed", "0",
            "--batch-size", "2", "--num-workers", "0", "--no-progress", "--precision", "fp32"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory, data_root) -> Path:
    path = tmp_path_factory.mktemp("small") / "manifest.csv"
    make_tiny_manifest(path, **SMALL)
    return path


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory, small_manifest, data_root):
    """One uninterrupted single-thread extraction of the small manifest."""
    with one_thread():
        path = extract_features(manifest_path=small_manifest, cache_dir=tmp_path_factory.mktemp("ref"),
                                data_root=data_root, **SMALL_ARGS)
    return load_features(path)


@pytest.fixture(scope="module")
def study_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("out")


@pytest.fixture(scope="module")
def tiny_cache(study_out, tiny_manifest, data_root) -> Path:
    return extract_features(manifest_path=tiny_manifest, cache_dir=study_out / "features", data_root=data_root,
                            **TINY_ARGS)


def test_tiny_features_are_finite_rows_x_1280_in_manifest_order(tiny_cache, tiny_manifest):
    fs = load_features(tiny_cache)
    manifest = read_manifest(tiny_manifest)
    n_aug = int((manifest["split"] != "test").sum())
    assert fs.features.shape == (len(manifest) + n_aug, 1280) and np.isfinite(fs.features).all()
    assert fs.sample_id[:len(manifest)].tolist() == manifest["sample_id"].tolist()
    assert fs.view.tolist() == [0] * len(manifest) + [1] * n_aug
    assert fs.labels[:len(manifest)].tolist() == manifest["label"].tolist()
    assert set(fs.split[fs.view == 1]) == {"train", "val"}
    clean = dict(zip(fs.sample_id[fs.view == 0], fs.features[fs.view == 0]))
    augmented = fs.features[fs.view == 1]
    assert not any(np.array_equal(clean[s], a) for s, a in zip(fs.sample_id[fs.view == 1], augmented))
    assert fs.extract_s is not None and fs.extract_s > 0  # the cost the report charges to the heads


def test_rerun_is_a_cache_hit_that_never_loads_the_model(tiny_cache, tiny_manifest, data_root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded on a cache hit")

    monkeypatch.setattr(engine, "load_backbone", refuse)
    monkeypatch.setattr(engine, "FeatureRunner", refuse)
    mtime = tiny_cache.stat().st_mtime_ns
    again = extract_features(manifest_path=tiny_manifest, cache_dir=tiny_cache.parent, data_root=data_root,
                             **TINY_ARGS)
    assert again == tiny_cache and tiny_cache.stat().st_mtime_ns == mtime


def test_two_cpu_runs_are_bitwise_identical(small_reference, small_manifest, data_root, tmp_path):
    with one_thread():
        again = load_features(extract_features(manifest_path=small_manifest, cache_dir=tmp_path,
                                               data_root=data_root, **SMALL_ARGS))
    assert again.key == small_reference.key
    assert np.array_equal(again.features, small_reference.features)
    assert small_reference.features.shape == (14, 1280) and np.isfinite(small_reference.features).all()


def _changed_manifest(tmp_path: Path, manifest_path: Path) -> Path:
    df = read_manifest(manifest_path)
    df.loc[df.index[-1], "split"] = "val" if df["split"].iloc[-1] == "test" else "test"
    path = tmp_path / "changed.csv"
    write_manifest(df, path)
    return path


CHANGES = {
    "backbone": ({"backbone": "efficientnet_lite1"}, "backbone.arch"),
    "weights_file": ("copy_weights", "backbone.weights"),
    "views": ({"views": 2}, "views"),
    "tta": ({"tta": "hflip"}, "tta"),
    "policy": ({"policy": "strong"}, "policy.name"),
    "seed": ({"seed": 1}, "seed"),
    "precision": ({"precision": "fp16"}, "precision"),
    "storage_dtype": ({"storage_dtype": "float16"}, "storage_dtype"),
    "channels_last": ({"channels_last": False}, "channels_last"),
    "manifest": ("changed_manifest", "manifest_hash"),
    "library_versions": ("torch_version", "versions.torch"),
}


@pytest.mark.parametrize("field", list(CHANGES))
def test_changing_each_spec_field_invalidates(field, tiny_cache, tiny_manifest, data_root, tmp_path, monkeypatch):
    change, differing = CHANGES[field]
    args = {k: v for k, v in TINY_ARGS.items() if k in ("backbone", "views", "policy", "seed", "tta")}
    args["manifest_path"] = tiny_manifest
    if change == "copy_weights":
        args["weights_file"] = str(shutil.copy(backbones._lite_package_file("efficientnet_lite0"),
                                               tmp_path / "lite0.pth"))
    elif change == "changed_manifest":
        args["manifest_path"] = _changed_manifest(tmp_path, tiny_manifest)
    elif change == "torch_version":
        real = cache.library_versions()
        monkeypatch.setattr(cache, "library_versions", lambda: {**real, "torch": "0.0.0"})
    else:
        args.update(change)
    job = plan_extraction(cache_dir=tiny_cache.parent, **args)
    assert job.key != tiny_cache.stem and not job.path.exists()  # a rerun would not reuse the cache
    with pytest.raises(CacheMismatch, match=rf"differing fields: .*{differing.replace('.', '[.]')}: expected"):
        check_cache(tiny_cache, expected_spec=job.spec)


def test_hflip_tta_adds_each_images_mirror_after_its_clean_view(small_reference, small_manifest, data_root, tmp_path):
    """Rows: view 0 of all 8 images, their mirrors (view -1, test images too), then the augmented views;
    the clean and augmented rows are the ones a cache without TTA holds, the mirror is the model's output
    on the left-right flipped clean tensor."""
    with one_thread():
        fs = load_features(extract_features(manifest_path=small_manifest, cache_dir=tmp_path, data_root=data_root,
                                            tta="hflip", **SMALL_ARGS))
    n, ref = 8, small_reference
    assert fs.view.tolist() == [0] * n + [-1] * n + [1] * 6 and fs.spec["tta"] == "hflip"
    assert fs.sample_id[n:2 * n].tolist() == fs.sample_id[:n].tolist()
    keep = fs.view != -1
    assert fs.sample_id[keep].tolist() == ref.sample_id.tolist()
    np.testing.assert_allclose(fs.features[keep], ref.features, rtol=0, atol=1e-5)
    bb = backbones.load_backbone("efficientnet_lite0")
    manifest = read_manifest(small_manifest)
    clean = eval_transform(bb.data_config)(load_rgb(data_root / manifest["path"][0]))
    with torch.inference_mode():
        mirrored = bb.model(torch.flip(clean, dims=[-1])[None]).numpy()[0]
    np.testing.assert_allclose(fs.features[n], mirrored, rtol=0, atol=1e-4)
    assert not np.allclose(fs.features[n], fs.features[0], atol=1e-2)


def _parts(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob(".*.parts/rows-*.npy"))


def test_killed_and_rerun_equals_uninterrupted(small_reference, small_manifest, data_root, tmp_path, monkeypatch):
    proc = subprocess.Popen([sys.executable, *_cli_args(small_manifest, tmp_path, data_root)], cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(_parts(tmp_path)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_rows = sum(np.load(p).shape[0] for p in _parts(tmp_path))
    assert 4 <= done_rows < 14 and not list(tmp_path.glob("*.h5")), "the kill should land mid-extraction"

    computed = []
    real_call = engine.FeatureRunner.__call__
    monkeypatch.setattr(engine.FeatureRunner, "__call__", lambda self, x: computed.append(len(x)) or real_call(self, x))
    with one_thread():
        resumed = load_features(extract_features(manifest_path=small_manifest, cache_dir=tmp_path,
                                                 data_root=data_root, **SMALL_ARGS))
    assert sum(computed) == 14 - done_rows  # only the missing batches ran
    assert np.array_equal(resumed.features, small_reference.features)
    assert not list(tmp_path.glob(".*.parts"))


def test_two_gloo_processes_equal_one(small_reference, small_manifest, data_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_cli_args(small_manifest, tmp_path, data_root)]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(rank 1)" in done.stderr and "(rank 0)" in done.stderr  # both ranks extracted a share
    merged = load_features(Path(done.stdout.strip().splitlines()[-1]))
    assert merged.key == small_reference.key
    assert merged.sample_id.tolist() == small_reference.sample_id.tolist()
    assert np.array_equal(merged.features, small_reference.features)


def test_invalid_cache_is_an_error_unless_rebuild(small_reference, small_manifest, data_root, tmp_path):
    broken = tmp_path / small_reference.path.name
    shutil.copy(small_reference.path, broken)
    with h5py.File(broken, "r+") as f:
        f["features"][3, 0] = np.nan
    with pytest.raises(CacheMismatch, match="non-finite"):
        extract_features(manifest_path=small_manifest, cache_dir=tmp_path, data_root=data_root, **SMALL_ARGS)
    with one_thread():
        rebuilt = extract_features(manifest_path=small_manifest, cache_dir=tmp_path, data_root=data_root,
                                   rebuild=True, **SMALL_ARGS)
    assert np.array_equal(load_features(rebuilt).features, small_reference.features)


def test_unreadable_image_names_the_sample(small_manifest, data_root, tmp_path):
    df = read_manifest(small_manifest)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    df.loc[0, "path"] = str(bad)
    df.loc[0, "sha256"] = ""
    path = tmp_path / "manifest.csv"
    write_manifest(df, path)
    with pytest.raises(ImageUnreadable, match=rf"sample '{df.loc[0, 'sample_id']}' .*broken.jpg.*cannot be read"):
        extract_features(manifest_path=path, cache_dir=tmp_path / "f", data_root=data_root,
                         **{**SMALL_ARGS, "num_workers": 1})
    assert not list((tmp_path / "f").glob("*.h5"))


def test_stage_writes_features_json_and_skips_unavailable_weights(study_out, tiny_cache, tiny_manifest, data_root,
                                                                 tmp_path, monkeypatch):
    from extract.stage import run

    monkeypatch.setenv(backbones.OFFLINE_ENV, "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    (study_out / "dataset").mkdir(exist_ok=True)
    shutil.copy(tiny_manifest, study_out / "dataset" / "manifest.csv")
    cfg = validate({"backbones": ["efficientnet_lite0", "resnet50"], "views": 1, "tta": "none", "batch_size": 16,
                    "num_workers": 1}, SCHEMA, prefix="extract")
    ctx = StudyContext(config={"seed": 0, "extract": cfg}, data_root=data_root, out_dir=study_out,
                       run_dir=tmp_path / "run", device="cpu")
    run(ctx)
    entries = json.loads((ctx.run_dir / "features.json").read_text())
    assert entries == [{"backbone": "efficientnet_lite0", "path": str(tiny_cache), "key": tiny_cache.stem}]
    skips = [json.loads(line) for line in (ctx.run_dir / "skipped.jsonl").read_text().splitlines()]
    assert len(skips) == 1 and skips[0]["stage"] == "extract" and "resnet50-11ad3fa6.pth" in skips[0]["fix"]


def test_stage_rejects_unknown_backbone_before_work(study_out, data_root, tmp_path):
    from extract.stage import run

    cfg = validate({"backbones": ["efficientnet_lite0", "resnet51"]}, SCHEMA, prefix="extract")
    ctx = StudyContext(config={"seed": 0, "extract": cfg}, data_root=data_root, out_dir=study_out,
                       run_dir=tmp_path / "run", device="cpu")
    with pytest.raises(ValueError, match="extract.backbones: unknown backbone 'resnet51'"):
        run(ctx)
    assert not (ctx.run_dir / "features.json").exists()
