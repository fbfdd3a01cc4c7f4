"""Faults in the caches and the writes (issue 12), each tried as a user's machine meets it, on tiny real data.

Fine-tune checkpoints truncated, altered or missing; saved heads deleted or truncated; writes that fail
(disk full) in the store, a head, a checkpoint and the results append; finite garbage in a store chunk;
two studies at once on one ``--out``. Each ends in one ``error:`` line (exit 2) naming the file and the
fix, or in a rerun equal to a run that never failed. Precision is fp32 throughout.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import classify.search
import classify.stage
import run_study
import study.atomic
import study.results
from classify.store import HeadDamaged, load_head
from dataset.manifest import read_manifest
from dataset.views import study_requests
from extract.cache import load_feature_set
from extract.engine import PassSettings, ensure_rows
from extract.store import Store, StoreDamaged
from finetune.checkpoint import CheckpointDamaged, load_checkpoint, save_checkpoint
from study.context import StudyContext
from study.errors import StudyError, WriteFailed
from study.results import read_rows
from tests.classify_fixtures import (
    EXTRACT_CONFIG,
    small_classify_config,
    small_fewshot_config,
    small_tune_config,
    tiny_lite0_features,
)
from tests.conftest import DATA_ROOT, REPO, TEST_BACKBONE
from tests.finetune_fixtures import recipe

pytestmark = pytest.mark.needs_data

SETTINGS = PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False)


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def no_temp_files(folder: Path) -> bool:
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def features(tmp_path_factory, tiny_manifest):
    """Real Lite0 features of the tiny manifest (4 classes x 6/2/4 images), shared with the classify tests."""
    return tiny_lite0_features(tmp_path_factory, tiny_manifest)


# ====================================================================== 1. fine-tune checkpoints


@pytest.fixture(scope="module")
def ft(features, tiny_manifest):
    """ft:head on the pooled store rows: a few epochs of a linear head, seconds on a CPU."""
    from extract.backbones import load_backbone
    from finetune.inputs import load_prefix
    from finetune.train import CachedSource

    hp = recipe()
    hp.update(epochs=3, patience=10, views=1, batch_size=8, lr=3e-3, warmup_epochs=1, num_workers=0,
              precision="fp32", tta="none")
    manifest = read_manifest(tiny_manifest)
    cache = load_prefix(Store.open(features.path), manifest=manifest, views=1, tta="none", policy="light",
                        view_seed=0)
    s = cache.splits
    return {"lite0": load_backbone("efficientnet_lite0"), "hp": hp,
            "train": CachedSource(s["train"].acts, s["train"].labels),
            "val": CachedSource(s["val"].acts, s["val"].labels)}


def fit(ft, ckpt_dir: Path, on_epoch_end=None):
    """A fresh process's fit: scratch weights, then resume from whatever ``ckpt_dir`` holds."""
    from finetune.model import build_split_net
    from finetune.train import Trainer

    net = build_split_net(ft["lite0"], policy="head", n_classes=4, seed=0)
    trainer = Trainer(net=net, hp=ft["hp"], seed=0, device="cpu", ckpt_dir=ckpt_dir, run_key="faults")
    seen = []

    def hook(epoch, stats):
        seen.append(epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
    result = trainer.fit(ft["train"], ft["val"], on_epoch_end=hook)
    return result, {k: v.clone() for k, v in net.trainable_state().items()}, seen


@pytest.fixture(scope="module")
def straight(ft, tmp_path_factory):
    return fit(ft, tmp_path_factory.mktemp("straight"))


def assert_equal_fit(got, straight):
    (res, state, _), (ref, ref_state, _) = got, straight
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in ref.history]
    assert res.best_epoch == ref.best_epoch and res.best_score == ref.best_score
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)


def interrupt_after(n: int):
    def hook(epoch, stats):
        if epoch == n:
            raise KeyboardInterrupt
    return hook


@pytest.mark.parametrize("damage", ["truncate", "finite garbage"])
def test_a_damaged_last_pt_restarts_from_scratch_with_a_warning_and_ends_equal(ft, straight, tmp_path, caplog,
                                                                               damage):
    with pytest.raises(KeyboardInterrupt):
        fit(ft, tmp_path, on_epoch_end=interrupt_after(1))
    last = tmp_path / "last.pt"
    raw = bytearray(last.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # same length, other (finite) bytes in the middle of the tensor data: torch.load alone accepts this
        mid = len(raw) // 2
        raw[mid:mid + 64] = np.full(16, 0.5, np.float32).tobytes()
    last.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="finetune.checkpoint"):
        again = fit(ft, tmp_path)
    assert str(last) in caplog.text and "from scratch" in caplog.text
    assert again[0].resumed_from is None and again[2] == [0, 1, 2]
    assert_equal_fit(again, straight)


def test_a_missing_best_pt_is_recomputed_not_a_type_error(ft, straight, tmp_path, caplog):
    fit(ft, tmp_path)  # finished: last.pt says every epoch ran
    (tmp_path / "best.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="finetune.checkpoint"):
        again = fit(ft, tmp_path)  # was: TypeError: 'NoneType' object is not subscriptable
    assert "best.pt is missing" in caplog.text and again[2] == [0, 1, 2]
    assert_equal_fit(again, straight)


def test_a_best_pt_damaged_during_training_is_an_error_naming_it_and_the_rerun_retrains(ft, straight, tmp_path):
    def damage_best(epoch, stats):
        if epoch == 2:
            (tmp_path / "best.pt").write_bytes(b"PK\x03\x04 not a checkpoint")

    with pytest.raises(CheckpointDamaged, match=r"best\.pt is not a readable checkpoint.*rerun the same command") as e:
        fit(ft, tmp_path, on_epoch_end=damage_best)
    assert isinstance(e.value, StudyError) and str(tmp_path / "best.pt") in str(e.value)
    assert not (tmp_path / "last.pt").exists()  # so the rerun trains again instead of meeting the same error
    again = fit(ft, tmp_path)
    assert again[2] == [0, 1, 2]
    assert_equal_fit(again, straight)


def test_a_checkpoint_save_that_fails_leaves_the_last_good_one_and_the_rerun_ends_equal(ft, straight, tmp_path,
                                                                                       monkeypatch):
    real = study.atomic.fsync_path
    calls = {"last": 0}

    def full_disk_at_second_last_pt(path):
        if Path(path).name.startswith(".last.pt."):
            calls["last"] += 1
            if calls["last"] == 2:
                enospc()
        real(path)

    monkeypatch.setattr(study.atomic, "fsync_path", full_disk_at_second_last_pt)
    with pytest.raises(WriteFailed, match=r"cannot write .*last\.pt \(No space left on device\): free disk space"):
        fit(ft, tmp_path)
    monkeypatch.undo()
    assert no_temp_files(tmp_path)
    assert load_checkpoint(tmp_path / "last.pt", run_key="faults")["epoch"] == 0  # the previous one, whole
    again = fit(ft, tmp_path)
    assert again[0].resumed_from == 0 and again[2] == [1, 2]
    assert_equal_fit(again, straight)


def test_checkpoints_are_sealed_and_written_atomically(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"run_key": "k", "epoch": 0, "x": torch.arange(4.0)})
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 0  # still a plain torch file
    assert b"STUDY-CHECKPOINT-SHA256:" in (tmp_path / "last.pt").read_bytes()[-100:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    with pytest.raises(StudyError, match="belongs to run k, not other"):
        load_checkpoint(tmp_path / "last.pt", run_key="other")


# ====================================================================== 2-4. heads and the store

# One trial: fresh searches in different folders choose alike (an exact val tie between trials would go to the
# cheaper one by wall seconds, which differ from run to run).
ONE_TRIAL = small_tune_config(trials=1, head={"norm": ["l2"], "lr_C": {"low": 0.1, "high": 1.0, "log": True}})


def classify_ctx(out: Path, name: str, *, manifest: Path, store_entry: Path) -> StudyContext:
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True)
    cfg = small_classify_config(heads=["lr"], feature_sets=["clean"])
    ctx = StudyContext(config={"seed": 0, "classify": cfg, "tune": ONE_TRIAL,
                               "fewshot": small_fewshot_config(k=[]), "extract": EXTRACT_CONFIG},
                       data_root=out, out_dir=out, run_dir=run_dir, device="cpu")
    if not ctx.manifest_path.is_file():
        ctx.dataset_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(manifest, ctx.manifest_path)
    entry = {"backbone": "efficientnet_lite0", "store": os.path.relpath(store_entry, out)}
    (run_dir / "features.json").write_text(json.dumps([entry]))
    return ctx


def run_classify(out: Path, name: str, *, manifest: Path, store_entry: Path) -> tuple[StudyContext, dict]:
    ctx = classify_ctx(out, name, manifest=manifest, store_entry=store_entry)
    classify.stage.run(ctx)
    (row,) = read_rows(ctx.results_path)
    return ctx, row


def same_numbers(a: dict, b: dict) -> bool:
    return a["metrics"] == b["metrics"] and a["test_pred"] == b["test_pred"] and a["hyperparams"] == b["hyperparams"]


@pytest.fixture(scope="module")
def clean_head(tmp_path_factory, tiny_manifest, features):
    out = tmp_path_factory.mktemp("clean_head")
    return run_classify(out, "a", manifest=tiny_manifest, store_entry=features.path)[1]


class Fits:
    """Counts head fits (the chosen trial's refit, patched in): a reused head makes none."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = classify.search._refit_chosen
        monkeypatch.setattr(classify.search, "_refit_chosen", lambda *a, **k: self._count() or real(*a, **k))

    def _count(self):
        self.n += 1


@pytest.mark.parametrize("damage", ["delete head.joblib", "truncate head.joblib", "delete meta.json",
                                    "truncate meta.json"])
def test_a_deleted_or_truncated_head_file_is_refit_on_the_next_run(tmp_path, tiny_manifest, features, clean_head,
                                                                    monkeypatch, caplog, damage):
    out = tmp_path / "out"
    ctx, first = run_classify(out, "a", manifest=tiny_manifest, store_entry=features.path)
    head_dir = ctx.heads_dir / first["head_key"]
    action, name = damage.split()
    if action == "delete":
        (head_dir / name).unlink()
    else:
        data = (head_dir / name).read_bytes()
        (head_dir / name).write_bytes(data[: len(data) // 2])
    fits = Fits(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="classify.store"):
        _, again = run_classify(out, "b", manifest=tiny_manifest, store_entry=features.path)
    assert fits.n == 1 and f"head {head_dir} is damaged" in caplog.text and name in caplog.text
    assert same_numbers(again, clean_head) and same_numbers(first, clean_head)
    model, meta = load_head(head_dir)  # restored, whole
    assert meta["class_names"] == first["class_names"] and hasattr(model, "predict")
    run_classify(out, "c", manifest=tiny_manifest, store_entry=features.path)
    assert fits.n == 1  # and reused again once whole


@pytest.mark.parametrize("damage", ["delete head.joblib", "truncate head.joblib", "truncate meta.json"])
def test_predict_on_a_damaged_head_says_what_is_wrong_and_what_to_do(tmp_path, tiny_manifest, features, data_root,
                                                                     capsys, damage):
    from pipeline.predict import main

    ctx, row = run_classify(tmp_path / "out", "a", manifest=tiny_manifest, store_entry=features.path)
    head_dir = ctx.heads_dir / row["head_key"]
    action, name = damage.split()
    if action == "delete":
        (head_dir / name).unlink()
    else:
        (head_dir / name).write_bytes((head_dir / name).read_bytes()[:40])
    image = data_root / read_manifest(tiny_manifest)["path"][0]
    capsys.readouterr()
    assert main(["--head", str(head_dir), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {head_dir} is not a usable saved head: ") and "\n" not in err
    assert name in err and "Rerun the classify stage with the same config and --out" in err
    with pytest.raises(HeadDamaged):
        load_head(head_dir)


def test_a_head_save_that_fails_leaves_nothing_half_written_and_the_rerun_equals_a_clean_run(
        tmp_path, tiny_manifest, features, clean_head, monkeypatch):
    import classify.store

    real_dump = classify.store.joblib.dump

    def half_then_full_disk(model, path, *a, **k):
        real_dump(model, path, *a, **k)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        enospc()

    monkeypatch.setattr(classify.store.joblib, "dump", half_then_full_disk)
    out = tmp_path / "out"
    with pytest.raises(WriteFailed, match=r"cannot write .*head\.joblib \(No space left on device\): free disk"):
        run_classify(out, "a", manifest=tiny_manifest, store_entry=features.path)
    monkeypatch.undo()
    (head_dir,) = [p for p in (out / "heads").iterdir() if p.is_dir()]  # beside it: the head's lock file
    assert list(head_dir.iterdir()) == [] and no_temp_files(out / "heads")  # no model, no rows: nothing to reuse
    _, again = run_classify(out, "b", manifest=tiny_manifest, store_entry=features.path)
    assert same_numbers(again, clean_head)
    load_head(head_dir)


def damage_data_chunk(seg: Path) -> None:
    """Finite garbage (plausible floats) over the first data chunk of a segment, in place."""
    with h5py.File(seg, "r") as f:
        info = f["data"].id.get_chunk_info(0)
    with open(seg, "r+b") as fh:
        fh.seek(info.byte_offset + 64)
        fh.write(np.random.default_rng(0).normal(size=64).astype(np.float32).tobytes())


def test_garbage_in_a_store_chunk_is_named_and_after_rebuild_the_head_equals_the_clean_one(
        tmp_path, tiny_manifest, features, clean_head):
    manifest = read_manifest(tiny_manifest)
    root = tmp_path / "out" / "store"
    shutil.copytree(features.path, root / features.path.name)
    store = Store.open(root / features.path.name)
    seg = max(store.segments(), key=lambda p: p.stat().st_size)
    damage_data_chunk(seg)
    with pytest.raises(StoreDamaged, match=re.escape(str(seg)) + ".*rerun with --rebuild-cache"):
        run_classify(tmp_path / "out", "a", manifest=tiny_manifest, store_entry=store.dir)
    assert not (tmp_path / "out" / "heads").exists()  # nothing was fitted on the damaged rows
    ensure_rows(manifest=manifest, backbone="efficientnet_lite0", policy="light", view_seed=0,
                requests=study_requests(manifest, views=1, tta="none"), store_root=root, settings=SETTINGS,
                rebuild=True, data_root=DATA_ROOT)  # what --rebuild-cache does in the extract stage
    _, row = run_classify(tmp_path / "out", "b", manifest=tiny_manifest, store_entry=store.dir)
    assert row["metrics"] == clean_head["metrics"] and row["test_pred"] == clean_head["test_pred"]
    assert row["hyperparams"] == clean_head["hyperparams"]


def test_other_bytes_in_the_store_give_another_head_key_and_a_refit(tmp_path, tiny_manifest, features, clean_head,
                                                                   monkeypatch):
    """Heads are keyed by the content identity of the rows they read, not by the store's spec."""
    manifest = read_manifest(tiny_manifest)
    src = Store.open(features.path)
    index = src.index()
    keys = sorted(index.rows)
    data = src.read(keys, index)
    data[0] += 1e-3  # one row, a little: still valid bytes, checksums and digests
    other = Store(tmp_path / "out" / "store", src.spec)
    other.create()
    other.write_segment(keys, data, compute_s=1.0)
    assert other.key == src.key  # the same spec ...
    fs = load_feature_set(other, manifest=manifest, views=1, tta="none", policy="light", view_seed=0)
    assert fs.key != features.key  # ... other content
    out = tmp_path / "out"
    fits = Fits(monkeypatch)
    _, first = run_classify(out, "a", manifest=tiny_manifest, store_entry=features.path)
    _, row = run_classify(out, "b", manifest=tiny_manifest, store_entry=other.dir)
    assert first["head_key"] == clean_head["head_key"] and first["cache_key"] == features.key
    assert fits.n == 2 and row["head_key"] != first["head_key"] and row["cache_key"] == fs.key


# ====================================================================== 3. write faults in a whole run


SOURCES = ('[[data.sources]]\nname = "imagenette"\npath = "imagenette"\nclasses = ["golf_ball", "tench"]\n'
           "max_per_class = 6\n")


def study_config(tmp_path: Path, stages: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(f'name = "faults"\nstages = [{stages}]\n[data]\nworkers = 1\n{SOURCES}'
                    '[data.split]\nprotocol = "fraction"\ntrain_fraction = 0.5\nval_fraction = 0.25\n'
                    # the tiny test network: these runs test faults of caches and files, not transfer
                    f'[extract]\nbackbones = ["{TEST_BACKBONE}"]\nviews = 0\ntta = "none"\nprecision = "fp32"\n'
                    'num_workers = 0\nbatch_size = 8\n'
                    '[classify]\nheads = ["lr"]\nfeature_sets = ["clean"]\nbootstrap = 20\n'
                    '[fewshot]\nk = []\n[finetune]\npolicies = ["head"]\nviews = 0\ntta = "none"\n'
                    '[tune]\ntrials = 2\nsampler = "random"\n[tune.head]\nnorm = ["l2"]\n'
                    'lr_C = {low = 0.1, high = 1.0, log = true}\n')
    return path


def run_cli(capsys, config: Path, out: Path, data_root: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = run_study.main(["--config", str(config), "--data-root", str(data_root), "--out", str(out), *extra])
    return rc, capsys.readouterr().err.strip()


def last_run(out: Path) -> Path:
    return max((out / "runs").iterdir(), key=lambda p: p.stat().st_mtime_ns)


def one_error_line(rc: int, err: str) -> str:
    """Exit 2 and one ``error:`` line, the last on stderr (progress bars come before it), no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def clean_study(tmp_path_factory, data_root):
    """dataset, extract and an LR head on 12 imagenette images: the run that never failed."""
    tmp = tmp_path_factory.mktemp("clean_study")
    config = study_config(tmp, '"dataset", "extract", "classify"')
    out = tmp / "out"
    assert run_study.main(["--config", str(config), "--data-root", str(data_root), "--out", str(out)]) == 0
    run = last_run(out)
    return config, read_rows(run / "results.jsonl"), json.loads((run / "features.json").read_text())


def test_a_store_segment_write_that_fails_is_one_error_line_and_the_rerun_equals_a_clean_run(
        tmp_path, data_root, clean_study, capsys, monkeypatch):
    config, clean_rows, clean_features = clean_study
    out = tmp_path / "out"
    real_fsync = os.fsync

    def segment_cannot_reach_the_disk(fd):
        if ".seg-" in os.readlink(f"/proc/self/fd/{fd}"):
            enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", segment_cannot_reach_the_disk)
    err = one_error_line(*run_cli(capsys, config, out, data_root))
    monkeypatch.undo()
    assert "cannot write" in err and "/store/" in err and "seg-" in err and "No space left" in err
    assert "free disk space" in err
    store = out / clean_features[0]["store"]
    assert not list(store.glob("seg-*.h5")) and no_temp_files(out / "store")
    rc, _ = run_cli(capsys, config, out, data_root)
    assert rc == 0
    rows = read_rows(last_run(out) / "results.jsonl")
    assert [same_numbers(a, b) for a, b in zip(rows, clean_rows)] == [True] * len(clean_rows) == [True]


def test_a_results_append_that_fails_is_one_error_line_and_the_rerun_equals_a_clean_run(
        tmp_path, data_root, clean_study, capsys, monkeypatch):
    config, clean_rows, _ = clean_study
    out = tmp_path / "out"

    real_write = study.results._write

    def full_disk(fd, data):  # half of the first results line reaches the disk, then it is full
        real_write(fd, bytes(data[: len(data) // 2]))
        enospc()

    monkeypatch.setattr(study.results, "_write", full_disk)
    err = one_error_line(*run_cli(capsys, config, out, data_root))
    monkeypatch.undo()
    assert "No space left on device" in err and "free disk space" in err and "rerun the same command" in err
    failed = last_run(out)
    assert json.loads((failed / "provenance.json").read_text())["status"] == "failed"
    rc, _ = run_cli(capsys, config, out, data_root)
    assert rc == 0 and last_run(out) != failed
    (row,) = read_rows(last_run(out) / "results.jsonl")
    assert same_numbers(row, clean_rows[0])


def test_a_segment_write_on_a_really_full_disk_is_a_message_not_a_segfault(tmp_path):
    """A real full file system (a 256 KiB tmpfs): HDF5 writing a file there crashed the interpreter at exit."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        code = ("import sys, numpy as np\nfrom extract.store import Store\nfrom study.errors import StudyError\n"
                f"s = Store({str(mnt)!r}, {{'storage_dtype': 'float32', 'x': 1}}); s.create()\n"
                "keys = [(f'{i:064x}', 'clean') for i in range(100)]\n"
                "data = np.random.default_rng(0).random((100, 1280), dtype=np.float32)\n"
                "try:\n    s.write_segment(keys, data, compute_s=1.0)\n"
                "except StudyError as e:\n    print(e)\n    sys.exit(2)\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
        assert "No space left on device" in done.stdout and "free disk space" in done.stdout
        assert sorted(p.name for p in mnt.glob("*/*")) == ["spec.json"]  # no half-written segment, no temp file
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ====================================================================== 5. two studies at once on one --out


def test_run_folders_never_collide_even_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(run_study, "utc_now", lambda: "2026-01-01T00:00:00Z")
    # Another process may create the folder between any check and the mkdir: make every check say "free".
    monkeypatch.setattr(Path, "exists", lambda self: False)
    made, barrier = [], threading.Barrier(8)

    def start():
        barrier.wait()
        made.append(run_study.make_run_dir(tmp_path, "quick"))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 8 and len(set(made)) == 8
    assert sorted(p.name for p in made)[0] == "20260101T000000Z-quick"


def test_a_run_folder_that_cannot_be_made_is_one_error_line(tmp_path, data_root, capsys, monkeypatch):
    config = study_config(tmp_path, '"dataset"')
    out, real_mkdir = tmp_path / "out", Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == out / "runs":
            enospc()
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    err = one_error_line(*run_cli(capsys, config, out, data_root))
    assert "cannot write" in err and str(tmp_path / "out" / "runs") in err and "No space left" in err


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_two_studies_at_once_on_one_out_both_finish_with_equal_numbers(tmp_path, data_root):
    config = study_config(tmp_path, '"dataset", "extract", "classify"')
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "run_study.py"), "--config", str(config), "--data-root", str(data_root),
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2
    rows = [read_rows(r / "results.jsonl") for r in runs]
    assert len(rows[0]) == len(rows[1]) == 1 and same_numbers(rows[0][0], rows[1][0])
    features = [json.loads((r / "features.json").read_text())[0] for r in runs]
    assert features[0]["store"] == features[1]["store"]
    store = Store.open(out / features[0]["store"])
    stored = sum(store.index().sizes.values())
    assert sorted(f["computed"] for f in features) == [0, stored] and stored == len(read_manifest(
        out / "dataset" / "manifest.csv"))  # one computed every row once, the other waited and found them
    # The dataset was built once: the second study waited for the first, then reused its build.
    assert sorted("[reused]" in o[1] for o in outs) == [False, True]


def test_a_results_append_cut_off_by_a_full_disk_leaves_no_half_line(tmp_path, monkeypatch):
    """The disk fills in the middle of a line: the file is cut back to its last whole line."""
    import errno

    from study import results
    from study.errors import WriteFailed

    path = tmp_path / "skipped.jsonl"
    results.append_skip(tmp_path, stage="a", what="first", reason="r")
    real_write, calls = results._write, []

    def half_then_full(fd, data):
        calls.append(1)
        if len(calls) == 1:
            return real_write(fd, bytes(data[:7]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "_write", half_then_full)
    with pytest.raises(WriteFailed, match="skipped.jsonl .No space left on device"):
        results.append_skip(tmp_path, stage="b", what="second", reason="r")
    monkeypatch.undo()
    assert [r["what"] for r in results.read_skips(tmp_path)] == ["first"] and path.read_text().endswith("\n")
