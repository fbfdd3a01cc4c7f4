"""Absent sources: a clear error before any work, or a verified download from a (localhost) archive."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from dataset.build import build_dataset
from dataset.config import SCHEMA
from dataset.download import DownloadError, extract_archive
from dataset.manifest import read_manifest
from dataset.sources import SourceMissing
from study.schema import validate

pytestmark = pytest.mark.needs_data


def cfg_for(source: dict, **extra) -> dict:
    raw = {"sources": [source], "workers": 1, **extra,
           "split": {"protocol": "fraction", "train_fraction": 0.5, "val_fraction": 0.0}}
    return validate(raw, SCHEMA)


@pytest.fixture()
def served(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (base url, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www
    server.shutdown()
    server.server_close()


def tiny_archive(dest: Path, data_root: Path) -> str:
    """A tar.gz holding tinyset/<class>/*.jpg (real Caltech images); returns its sha256."""
    with tarfile.open(dest, "w:gz") as tf:
        for cls in ("accordion", "anchor"):
            for f in sorted((data_root / "caltech101/101_ObjectCategories" / cls).glob("*.jpg"))[:4]:
                tf.add(f, arcname=f"tinyset/{cls}/{f.name}")
    return hashlib.sha256(dest.read_bytes()).hexdigest()


def test_missing_folder_fails_before_any_work_and_says_what_to_create(data_root, tmp_path):
    source = {"name": "mine", "path": "no_such_folder"}
    with pytest.raises(SourceMissing) as err:
        build_dataset(data_cfg=cfg_for(source), data_root=data_root, out_dir=tmp_path / "out", seed=0)
    message = str(err.value)
    assert str(data_root / "no_such_folder") in message and "one sub-folder per class" in message
    assert "url" in message and str(tmp_path / "downloads" / "mine") in message
    assert not (tmp_path / "out").exists()


def test_missing_caltech_names_its_class_folders(data_root, tmp_path):
    source = {"name": "caltech101", "kind": "caltech101", "path": "elsewhere/101_ObjectCategories"}
    with pytest.raises(SourceMissing, match="BACKGROUND_Google.*101_ObjectCategories.tar.gz"):
        build_dataset(data_cfg=cfg_for(source), data_root=data_root, out_dir=tmp_path / "out", seed=0)


def test_absent_source_is_downloaded_verified_and_extracted(data_root, tmp_path, served):
    base, www = served
    sha = tiny_archive(www / "tinyset.tar.gz", data_root)
    source = {"name": "tiny", "path": "tinyset", "url": f"{base}/tinyset.tar.gz", "sha256": sha}
    build = build_dataset(data_cfg=cfg_for(source), data_root=tmp_path / "readonly_root", out_dir=tmp_path / "o",
                          seed=0)
    df = read_manifest(build.manifest_path)
    assert len(df) == 8 and set(df["class_name"]) == {"accordion", "anchor"}
    assert (tmp_path / "downloads" / "tiny" / "tinyset" / "anchor").is_dir()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    (www / "tinyset.tar.gz").unlink()  # a second build must not download again
    again = build_dataset(data_cfg=cfg_for(source), data_root=tmp_path / "readonly_root", out_dir=tmp_path / "o2",
                          seed=0)
    assert again.manifest_hash == build.manifest_hash


def test_checksum_mismatch_and_unreachable_url_are_clear_errors(data_root, tmp_path, served):
    base, www = served
    tiny_archive(www / "tinyset.tar.gz", data_root)
    bad = {"name": "tiny", "path": "tinyset", "url": f"{base}/tinyset.tar.gz", "sha256": "0" * 64}
    with pytest.raises(SourceMissing, match="does not match"):
        build_dataset(data_cfg=cfg_for(bad), data_root=tmp_path, out_dir=tmp_path / "o", seed=0)
    gone = {**bad, "url": f"{base}/missing.tar.gz"}
    with pytest.raises(SourceMissing, match="could not download.*404"):
        build_dataset(data_cfg=cfg_for(gone), data_root=tmp_path, out_dir=tmp_path / "o", seed=0)
    assert not list((tmp_path / "downloads").glob("*.tar.gz"))  # no half or unverified archive left


def test_extraction_refuses_paths_escaping_the_target(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        extract_archive(evil, tmp_path / "target")
    evil_tar = tmp_path / "evil.tar"
    with tarfile.open(evil_tar, "w") as tf:
        info = tarfile.TarInfo("/etc/owned")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DownloadError, match="outside"):
        extract_archive(evil_tar, tmp_path / "target")
    assert not (tmp_path / "outside.txt").exists()
