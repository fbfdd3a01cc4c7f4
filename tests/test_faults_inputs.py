"""Faults in the config, the inputs and the output folder (issue 12), each tried as a user meets it.

A refused config is one ``error:`` line and exit status 2 before any work, with nothing under
``<out>/runs/``; odd entries in a user folder are listed with a reason, never a crash; an image
changed in place is noticed by its content; a moved ``--out`` is reused; output files get the
umask's permissions. All on a handful of tiny generated (or real) images.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import run_study
from dataset.build import build_dataset
from dataset.config import SCHEMA as DATA_SCHEMA
from dataset.manifest import read_manifest
from study.atomic import atomic_path, write_text_atomic
from study.hashing import file_sha256
from study.schema import validate

# ---------------------------------------------------------------- output file permissions


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "report.md", "# report\n")
        with atomic_path(tmp_path / "manifest.csv") as tmp:
            pd.DataFrame({"a": [1]}).to_csv(tmp, index=False)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("report.md", "manifest.csv", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "plain.txt", "report.md"]  # no temp left


# ---------------------------------------------------------------- refused before any work


def tiny_jpeg(path: Path, seed: int, *, size=(40, 32)) -> bytes:
    """A small JPEG of smooth random blobs (distinct perceptual hashes, so no two are near-copies)."""
    small = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=90)
    return path.read_bytes()


def user_root(tmp_path: Path, classes=("cat", "dog"), n=4) -> Path:
    root = tmp_path / "data" / "mine"
    for c, name in enumerate(classes):
        for i in range(n):
            tiny_jpeg(root / name / f"{i}.jpg", seed=100 * c + i)
    return root


def write_config(tmp_path: Path, *, sources: str, extra: str = "") -> Path:
    path = tmp_path / "study.toml"
    path.write_text(f'name = "faults"\n{extra}\n[data]\nworkers = 1\n{sources}\n'
                    '[data.split]\nprotocol = "fraction"\ntrain_fraction = 0.5\nval_fraction = 0.25\n')
    return path


MINE = '[[data.sources]]\nname = "mine"\npath = "mine"\n'


def refused(capsys, argv: list[str], out: Path) -> str:
    """Run the CLI; it must exit 2 with one 'error:' line and leave nothing under <out>/runs/."""
    assert run_study.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert not (out / "runs").exists() and not (out / "dataset").exists()
    return err


@pytest.mark.parametrize("overrides, expected", [
    (['extract.backbones=["efficientnet_lite0", "resnet5"]'],
     ["'extract.backbones[1]' has value 'resnet5'", "allowed: efficientnet_lite0"]),
    (["data.split.protocol=\"per_class\"", "data.split.train_per_class=3", "data.split.val_per_class=3"],
     ["'data.split.val_per_class' has value 3", "smaller than data.split.train_per_class (3)"]),
    (["data.split.protocol=\"per_class\"", "data.split.train_per_class=3", "data.split.val_per_class=0"],
     ["'data.split.val_per_class' has value 0", "at least 1 when the classify or finetune stage runs"]),
    (["data.split.val_fraction=0.0"], ["'data.split.val_fraction' has value 0.0", "above 0"]),
    (['extract.weights={resnet50="/models/r50.pth"}'],
     ["'extract.weights.resnet50' names a backbone that is not in extract.backbones ['efficientnet_lite0']"]),
])
def test_config_faults_are_one_error_line_before_any_work(tmp_path, capsys, overrides, expected):
    user_root(tmp_path)
    argv = ["--config", str(write_config(tmp_path, sources=MINE)), "--data-root", str(tmp_path / "data")]
    err = refused(capsys, [*argv, *(a for o in overrides for a in ("--set", o))], tmp_path / "out")
    for text in expected:
        assert text in err


def test_two_sources_with_one_name_are_refused(tmp_path, capsys):
    user_root(tmp_path)
    sources = MINE + '[[data.sources]]\nname = "mine"\npath = "other"\n'
    err = refused(capsys, ["--config", str(write_config(tmp_path, sources=sources)), "--data-root",
                           str(tmp_path / "data")], tmp_path / "out")
    assert "'data.sources[1].name' has value 'mine'" in err and "data.sources[0] is also named 'mine'" in err


def test_a_class_no_source_has_is_refused_before_any_work(tmp_path, capsys):
    user_root(tmp_path)
    sources = MINE + 'classes = ["cat", "dgo"]\n'
    err = refused(capsys, ["--config", str(write_config(tmp_path, sources=sources)), "--data-root",
                           str(tmp_path / "data")], tmp_path / "out")
    assert "'data.sources[0].classes'" in err and "['dgo'] is not a class folder" in err
    assert "['cat', 'dog']" in err  # what is allowed


def test_dataset_only_runs_may_have_no_val(tmp_path):
    from pipeline.config import load_config

    cfg = load_config(write_config(tmp_path, sources=MINE),
                      overrides=["data.split.val_fraction=0.0", 'stages=["dataset"]'])
    assert cfg["data"]["split"]["val_fraction"] == 0.0


def test_out_that_is_a_file_or_below_one_is_refused(tmp_path, capsys):
    user_root(tmp_path)
    argv = ["--config", str(write_config(tmp_path, sources=MINE)), "--data-root", str(tmp_path / "data")]
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me\n")
    assert "is a file, not a folder" in refused(capsys, argv, a_file)
    assert "cannot be created: " + str(a_file) + " is a file" in refused(capsys, argv, a_file / "out")
    assert a_file.read_text() == "keep me\n"


def test_out_that_is_not_writable_is_refused(tmp_path, capsys, monkeypatch):
    user_root(tmp_path)
    argv = ["--config", str(write_config(tmp_path, sources=MINE)), "--data-root", str(tmp_path / "data")]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: make the OS answer as it would for a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not str(p).startswith(str(locked)))
    try:
        err = refused(capsys, argv, locked / "out")
    finally:
        locked.chmod(0o755)
    assert f"--out {locked / 'out'} is not writable" in err and "pass a folder you can write in" in err
    assert not (locked / "out").exists()


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
@pytest.mark.needs_data
def test_unknown_backbone_fails_before_the_dataset_stage_as_a_process(tmp_path, data_root):
    """The real command line: exit 2, exactly one stderr line, no dataset built, no run folder."""
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(Path(run_study.__file__)), "--config", "configs/quick.toml",
                           "--data-root", str(data_root), "--out", str(out), "--set",
                           'extract.backbones=["efficientnet_lite0", "resnet5"]'],
                          capture_output=True, text=True, cwd=Path(run_study.__file__).parent, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: config key "
                                                                                        "'extract.backbones[1]'")
    assert not out.exists()


# ---------------------------------------------------------------- odd entries in a user folder


def data_cfg(**split) -> dict:
    raw = {"sources": [{"name": "mine", "path": "mine"}], "workers": 1,
           "split": {"protocol": "fraction", "train_fraction": 0.5, "val_fraction": 0.0, **split}}
    return validate(raw, DATA_SCHEMA)


@pytest.fixture()
def odd_folder(tmp_path) -> Path:
    """cat/ and dog/ with 4 images each, a symlink loop, a broken link, an undecodable name, an empty class."""
    root = user_root(tmp_path)
    os.symlink("loop.jpg", root / "cat" / "loop.jpg")  # points at itself
    os.symlink("gone.jpg", root / "cat" / "broken.jpg")
    tiny_jpeg(tmp_path / "latin1.jpg", seed=7)
    os.rename(tmp_path / "latin1.jpg", os.fsencode(root / "dog") + b"/caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    (root / "empty").mkdir()
    os.symlink("nowhere", root / "moved_class")  # a class folder link whose target is gone
    return root


def test_odd_entries_are_listed_with_a_reason_never_a_crash(odd_folder):
    out = odd_folder.parent.parent / "out"
    build = build_dataset(data_cfg=data_cfg(), data_root=odd_folder.parent, out_dir=out, seed=0)
    excluded = pd.read_csv(out / "excluded.csv", keep_default_na=False)
    reasons = dict(zip(excluded["path"], excluded["reason"]))
    assert reasons == {"mine/cat/broken.jpg": "broken_symlink", "mine/cat/loop.jpg": "symlink_loop",
                       "mine/dog/caf\\xe9.jpg": "undecodable_name", "mine/moved_class": "broken_symlink"}
    summary = json.loads(build.summary_path.read_text())
    assert {e["path"]: e["reason"] for e in summary["excluded"]} == reasons
    assert [(d["name"], d["reason"]) for d in summary["dropped_classes"]] == [
        ("mine/empty", "no usable images: the class folder is empty")]
    markdown = (out / "summary.md").read_text(encoding="utf-8")
    assert "`mine/dog/caf\\xe9.jpg`: undecodable_name" in markdown and "mine/empty: no usable images" in markdown
    df = read_manifest(build.manifest_path)
    assert df.groupby("class_name").size().to_dict() == {"cat": 4, "dog": 4}
    assert build.n_excluded == 4


def test_a_folder_whose_files_are_all_excluded_is_listed(tmp_path):
    root = user_root(tmp_path)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not an image\n")
    build = build_dataset(data_cfg=data_cfg(), data_root=root.parent, out_dir=tmp_path / "out", seed=0)
    dropped = json.loads(build.summary_path.read_text())["dropped_classes"]
    assert [(d["name"], d["reason"]) for d in dropped] == [
        ("mine/notes", "no usable images: all 1 files are excluded (see the excluded list)")]


def test_the_dataset_stage_records_an_empty_class_folder_as_a_skip(odd_folder, capsys):
    from study.results import read_skips

    tmp = odd_folder.parent.parent
    argv = ["--config", str(write_config(tmp, sources=MINE)), "--data-root", str(odd_folder.parent),
            "--out", str(tmp / "out"), "--stages", "dataset"]
    assert run_study.main(argv) == 0
    (run_dir,) = (tmp / "out" / "runs").iterdir()
    (skip,) = read_skips(run_dir)
    assert skip["what"] == "class mine/empty" and "add images" in skip["fix"]


# ---------------------------------------------------------------- content changed in place


def same_size_pair(tmp_path: Path) -> tuple[bytes, bytes]:
    """Two different JPEGs padded to one length (decoders stop at the end-of-image marker)."""
    a, b = tiny_jpeg(tmp_path / "a.jpg", seed=11), tiny_jpeg(tmp_path / "b.jpg", seed=12)
    n = max(len(a), len(b))
    return a + b"\0" * (n - len(a)), b + b"\0" * (n - len(b))


def test_an_image_re_encoded_in_place_is_noticed_by_its_content(tmp_path, monkeypatch):
    from dataset import build as build_module
    from dataset import index as index_module

    # The files were written a moment ago; pretend the clock tick is fine-grained so the build trusts their
    # stat at once (else everything is re-hashed anyway and the test would not show the stat check works).
    monkeypatch.setattr(index_module, "RACY_NS", 0)
    monkeypatch.setattr(build_module, "RACY_NS", 0)
    root = user_root(tmp_path)
    before, after = same_size_pair(tmp_path)
    target = root / "cat" / "0.jpg"
    target.write_bytes(before)
    cfg, out = data_cfg(), tmp_path / "out"
    first = build_dataset(data_cfg=cfg, data_root=root.parent, out_dir=out, seed=0)
    assert build_dataset(data_cfg=cfg, data_root=root.parent, out_dir=out, seed=0).reused

    damaged = root / "cat" / "1.jpg"
    for path, content in ((target, after), (damaged, b"\xff\xd8" + b"\0" * (damaged.stat().st_size - 2))):
        st = path.stat()
        path.write_bytes(content)  # rewritten in place: same size, and the old mtime put back
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    rebuilt = build_dataset(data_cfg=cfg, data_root=root.parent, out_dir=out, seed=0)
    assert not rebuilt.reused and rebuilt.manifest_hash != first.manifest_hash
    manifest = read_manifest(rebuilt.manifest_path).set_index("sample_id")
    # What extraction checks before it trusts a manifest row: so its "rebuild the dataset" advice now works,
    # for an image that changed (new sha256) and for one that no longer decodes (now excluded).
    assert manifest.loc["mine/cat/0.jpg", "sha256"] == file_sha256(target)
    assert "mine/cat/1.jpg" not in manifest.index
    excluded = pd.read_csv(out / "excluded.csv", keep_default_na=False)
    assert excluded.set_index("path").loc["mine/cat/1.jpg", "reason"] == "not_an_image"


# ---------------------------------------------------------------- a moved or copied --out


@pytest.mark.needs_data
def test_a_moved_out_folder_is_reused_and_a_copy_reads_only_itself(tmp_path, data_root, caplog):
    sources = ('[[data.sources]]\nname = "imagenette"\npath = "imagenette"\nclasses = ["golf_ball", "tench"]\n'
               "max_per_class = 6\n")
    config = write_config(tmp_path, sources=sources)

    caplog.set_level(logging.INFO)

    def dataset_stage(out: Path) -> None:
        caplog.clear()
        argv = ["--config", str(config), "--data-root", str(data_root), "--out", str(out), "--stages", "dataset"]
        assert run_study.main(argv) == 0

    dataset_stage(tmp_path / "out1")
    manifest = (tmp_path / "out1" / "dataset" / "manifest.csv").read_bytes()
    shutil.move(tmp_path / "out1", tmp_path / "out2")
    dataset_stage(tmp_path / "out2")
    assert "[reused]" in caplog.text and str(tmp_path / "out2" / "dataset" / "manifest.csv") in caplog.text
    assert str(tmp_path / "out1") not in (tmp_path / "out2" / "dataset" / "build.json").read_text()

    shutil.copytree(tmp_path / "out2", tmp_path / "out3")
    (tmp_path / "out2" / "dataset" / "manifest.csv").write_text("the original, changed after the copy\n")
    dataset_stage(tmp_path / "out3")
    assert "[reused]" in caplog.text
    assert (tmp_path / "out3" / "dataset" / "manifest.csv").read_bytes() == manifest
    build = build_dataset(data_cfg=run_study.load_config(config)["data"], data_root=data_root,
                          out_dir=tmp_path / "out3" / "dataset", seed=0)
    assert build.reused and build.manifest_path == tmp_path / "out3" / "dataset" / "manifest.csv"
