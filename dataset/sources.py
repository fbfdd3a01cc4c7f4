"""Image sources: find (or download) each source's folder and list its class folders' files.

Every regular file in a class folder is listed, whatever its suffix: whether it is an image is
decided later from its content (Caltech's ``BACKGROUND_Google/tmp`` is a JPEG without a suffix,
and a ``.txt`` in a class folder must be reported, not silently skipped).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dataset.download import DownloadError, download_archive, extract_archive, extract_nested
from study.errors import StudyError

log = logging.getLogger(__name__)
CALTECH_BACKGROUND = "BACKGROUND_Google"


class SourceMissing(StudyError, FileNotFoundError):
    """A source folder that is absent and could not be downloaded; the message says what to create."""


@dataclass(frozen=True)
class SourceFile:
    source: str
    folder: str  # the class folder's own name in its source
    path: Path  # absolute
    sample_id: str  # "<source>/<folder>/<file name>": unique and stable across machines


@dataclass(frozen=True)
class ResolvedSource:
    name: str
    kind: str
    path: Path
    downloaded: bool


def _what_goes_there(src: dict) -> str:
    if src["kind"] == "caltech101":
        return ("Caltech 101's class folders (accordion/, airplanes/, ..., BACKGROUND_Google/), i.e. the "
                "contents of 101_ObjectCategories from the official 101_ObjectCategories.tar.gz")
    return "one sub-folder per class, each holding that class's images"


def _find_extracted(root: Path, rel: str) -> Path | None:
    """The source folder inside an extracted archive: ``rel`` itself, else a folder named like its last part."""
    if (root / rel).is_dir():
        return root / rel
    name = Path(rel).name
    matches = sorted(p for p in root.rglob(name) if p.is_dir())
    return matches[0] if matches else None


def _download(src: dict, download_dir: Path) -> Path:
    if not src["sha256"]:
        raise DownloadError(f"source '{src['name']}' has a url but no sha256; set data.sources.sha256 "
                            "so the archive can be verified")
    target = download_dir / src["name"]
    found = _find_extracted(target, src["path"]) if target.is_dir() else None
    if found:
        return found
    archive_name = src["url"].rstrip("/").rsplit("/", 1)[-1] or "archive"
    archive = download_dir / f"{src['name']}-{archive_name}"
    log.info("downloading source %s from %s", src["name"], src["url"])
    download_archive(url=src["url"], sha256=src["sha256"], dest=archive)
    extract_archive(archive, target)
    found = _find_extracted(target, src["path"])
    if found is None:
        extract_nested(target)
        found = _find_extracted(target, src["path"])
    if found is None:
        raise DownloadError(f"the archive {src['url']} holds no folder '{src['path']}' (extracted into {target})")
    return found


def resolve_source(src: dict, *, data_root: Path, download_dir: Path) -> ResolvedSource:
    """The source's folder; download it when absent and a url is configured; else a SourceMissing error."""
    folder = Path(src["path"]) if Path(src["path"]).is_absolute() else data_root / src["path"]
    if folder.is_dir():
        return ResolvedSource(name=src["name"], kind=src["kind"], path=folder, downloaded=False)
    failure = ""
    if src["url"]:
        try:
            path = _download(src, download_dir)
            return ResolvedSource(name=src["name"], kind=src["kind"], path=path, downloaded=True)
        except DownloadError as exc:
            failure = f"Downloading it failed: {exc}. "
    raise SourceMissing(
        f"data source '{src['name']}' not found: the folder {folder} does not exist. {failure}"
        f"Create it holding {_what_goes_there(src)}; or pass --data-root pointing at the folder that "
        f"contains '{src['path']}'; or set data.sources url (+ sha256) for '{src['name']}' so the archive "
        f"is downloaded into {download_dir / src['name']} (data.download_dir; the data root may be read-only)."
    )


def _class_folders(src: dict, root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if src["kind"] == "caltech101" and not src["include_background"]:
        folders = [p for p in folders if p.name != CALTECH_BACKGROUND]
    if src["classes"]:
        names = {p.name for p in folders}
        unknown = [c for c in src["classes"] if c not in names]
        if unknown:
            raise ValueError(f"data source '{src['name']}': classes {unknown} are not folders of {root}; "
                             f"it has {sorted(names)[:12]}{' ...' if len(names) > 12 else ''}")
        wanted = set(src["classes"])
        folders = [p for p in folders if p.name in wanted]
    if not folders:
        raise ValueError(f"data source '{src['name']}' at {root} has no class sub-folders; "
                         f"expected {_what_goes_there(src)}")
    return folders


def list_source_files(src: dict, resolved: ResolvedSource) -> list[SourceFile]:
    """Every regular file of every selected class folder, in sorted order (``max_per_class`` keeps the first N)."""
    files = []
    for folder in _class_folders(src, resolved.path):
        with os.scandir(folder) as it:  # scandir: the file-type check needs no extra stat per file
            names = sorted(e.name for e in it if e.is_file())
        if src["max_per_class"]:
            names = names[: src["max_per_class"]]
        base = folder.absolute()
        files += [SourceFile(source=src["name"], folder=folder.name, path=base / name,
                             sample_id=f"{src['name']}/{folder.name}/{name}") for name in names]
    return files
