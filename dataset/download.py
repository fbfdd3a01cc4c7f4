"""Fetching a source's official archive when its folder is absent: download, verify sha256, extract safely.

Extraction refuses any member whose path would land outside the target folder (absolute paths,
``..``, links pointing out), so a hostile archive cannot write elsewhere.
"""
from __future__ import annotations

import shutil
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from study.atomic import atomic_path
from study.errors import StudyError
from study.hashing import file_sha256


class DownloadError(StudyError, RuntimeError):
    """A download, checksum or extraction that failed; the message says what to do instead."""


def download_archive(*, url: str, sha256: str, dest: Path, timeout_s: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (atomically) and check its sha256; reuse a verified file."""
    if dest.is_file() and file_sha256(dest) == sha256.lower():
        return dest
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, length=1 << 20)
            got = file_sha256(tmp)
            if got != sha256.lower():
                raise DownloadError(f"{url}: sha256 {got} does not match the configured {sha256}")
    except DownloadError:
        raise
    except OSError as exc:  # URLError, HTTPError, timeouts and disk errors are all OSErrors
        raise DownloadError(f"could not download {url}: {exc}") from exc
    return dest


def _inside(root: Path, member: str) -> bool:
    target = (root / member).resolve()
    return target == root or root in target.parents


def extract_archive(archive: Path, target: Path) -> None:
    """Extract a .zip or tar(.gz/.bz2/.xz) into ``target``; refuse members escaping it."""
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            bad = [n for n in zf.namelist() if not _inside(root, n)]
            if bad:
                raise DownloadError(f"{archive}: refusing to extract {bad[0]!r}, it would land outside {target}")
            zf.extractall(root)
        return
    if not tarfile.is_tarfile(archive):
        raise DownloadError(f"{archive} is neither a zip nor a tar archive")
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            escapes = not _inside(root, m.name) or (m.issym() or m.islnk()) and not _inside(
                root, str(Path(m.name).parent / m.linkname) if m.issym() else m.linkname)
            if escapes or m.isdev():
                raise DownloadError(f"{archive}: refusing to extract {m.name!r}, it would land outside {target}")
        tf.extractall(root, filter="data")


def extract_nested(folder: Path) -> None:
    """Extract archives found inside an extracted archive (Caltech's zip holds a .tar.gz), one level."""
    for inner in sorted(folder.rglob("*")):
        if inner.is_file() and inner.name.endswith((".tar.gz", ".tgz", ".tar", ".zip")):
            extract_archive(inner, inner.parent)
