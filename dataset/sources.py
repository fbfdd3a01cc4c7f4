"""Image sources: find (or download) each source's folder and list its class folders' files.

Every regular file in a class folder is listed, whatever its suffix: whether it is an image is
decided later from its content (Caltech's ``BACKGROUND_Google/tmp`` is a JPEG without a suffix,
and a ``.txt`` in a class folder must be reported, not silently skipped). Entries that cannot be
read as files at all (a symlink loop, a broken symlink, a name that is not valid UTF-8, a fifo) are
listed too, with a ``problem``, so the build reports them instead of crashing or dropping them unseen.
"""
from __future__ import annotations

import difflib
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from dataset.download import DownloadError, download_archive, extract_archive, extract_nested
from study.errors import StudyError
from study.schema import ConfigError

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
    problem: str = ""  # why the entry cannot be read as a file (an exclusion reason); "" for a readable file
    detail: str = ""


@dataclass(frozen=True)
class SourceListing:
    source: str
    files: list[SourceFile]  # readable files and problem entries, in listing order
    folders: list[str] = field(default_factory=list)  # the selected class folders (printable names)


def printable(text: str) -> str:
    """A file system name as UTF-8 text: bytes that are not valid UTF-8 shown as ``\\xNN`` (CSV and JSON need UTF-8)."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.listdir decodes undecodable bytes to lone surrogates
        return False
    return True


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


def source_folder(src: dict, *, data_root: Path) -> Path:
    return Path(src["path"]) if Path(src["path"]).is_absolute() else data_root / src["path"]


def _missing(src: dict, *, folder: Path, download_dir: Path, failure: str = "") -> SourceMissing:
    return SourceMissing(
        f"data source '{src['name']}' not found: the folder {folder} does not exist. {failure}"
        f"Create it holding {_what_goes_there(src)}; or pass --data-root pointing at the folder that "
        f"contains '{src['path']}'; or set data.sources url (+ sha256) for '{src['name']}' so the archive "
        f"is downloaded into {download_dir / src['name']} (data.download_dir; the data root may be read-only)."
    )


def resolve_source(src: dict, *, data_root: Path, download_dir: Path) -> ResolvedSource:
    """The source's folder; download it when absent and a url is configured; else a SourceMissing error."""
    folder = source_folder(src, data_root=data_root)
    if folder.is_dir():
        return ResolvedSource(name=src["name"], kind=src["kind"], path=folder, downloaded=False)
    failure = ""
    if src["url"]:
        try:
            path = _download(src, download_dir)
            return ResolvedSource(name=src["name"], kind=src["kind"], path=path, downloaded=True)
        except DownloadError as exc:
            failure = f"Downloading it failed: {exc}. "
    raise _missing(src, folder=folder, download_dir=download_dir, failure=failure)


def check_source(src: dict, *, key: str, data_root: Path, download_dir: Path) -> None:
    """Before any work, without downloading: a present folder must hold the configured classes, an absent one
    needs a url. (A source still to be downloaded is checked by the dataset stage once it is there.)"""
    folder = source_folder(src, data_root=data_root)
    if folder.is_dir():
        _class_folders(src, folder, key=key)
    elif not src["url"]:
        raise _missing(src, folder=folder, download_dir=download_dir)


def _entry_problem(entry: os.DirEntry) -> tuple[str, str, str]:
    """(kind, problem, detail) of a folder entry: kind is "file", "dir" or "other"; problem "" when readable."""
    try:
        is_file, is_dir = entry.is_file(), entry.is_dir()
    except OSError as exc:  # is_file() follows links and raises on a loop (ELOOP) instead of answering False
        reason = "symlink_loop" if exc.errno == errno.ELOOP else "unreadable"
        return "other", reason, f"{exc.strerror}: {printable(os.readlink(entry.path)) if entry.is_symlink() else ''}"
    if entry.is_symlink() and not (is_file or is_dir):
        try:
            target = printable(os.readlink(entry.path))
        except OSError:
            target = "?"
        return "other", "broken_symlink", f"points to {target}, which does not exist"
    if is_dir:
        return "dir", "", ""
    if not is_file:
        return "other", "not_a_file", "a fifo, socket or device, not a regular file"
    if not _is_utf8(entry.name):
        return "file", "undecodable_name", "the file name is not valid UTF-8; rename it"
    return "file", "", ""


def _problem(src: dict, folder: str, entry: os.DirEntry, problem: str, detail: str) -> SourceFile:
    name = printable(entry.name)
    sample_id = f"{src['name']}/{folder}/{name}" if folder else f"{src['name']}/{name}"
    return SourceFile(source=src["name"], folder=folder or name, path=Path(os.path.abspath(entry.path)),
                      sample_id=sample_id, problem=problem, detail=detail)


def _class_folders(src: dict, root: Path, *, key: str) -> tuple[list[Path], list[SourceFile]]:
    """The selected class folders, and the entries of ``root`` that should have been folders but cannot be read."""
    folders, problems = [], []
    with os.scandir(root) as it:
        for entry in sorted(it, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            kind, problem, detail = _entry_problem(entry)
            if kind == "dir" and _is_utf8(entry.name):
                folders.append(Path(entry.path))
            elif kind == "dir":
                problems.append(_problem(src, "", entry, "undecodable_name",
                                         "the folder name is not valid UTF-8; rename it"))
            elif problem in ("symlink_loop", "broken_symlink"):  # perhaps meant as a class folder: say so
                problems.append(_problem(src, "", entry, problem, detail))
    if src["kind"] == "caltech101" and not src["include_background"]:
        folders = [p for p in folders if p.name != CALTECH_BACKGROUND]
    if src["classes"]:
        names = {p.name for p in folders}
        unknown = [c for c in src["classes"] if c not in names]
        if unknown:
            listed = sorted(names)[:12] + ([f"... {len(names) - 12} more"] if len(names) > 12 else [])
            close = {c: difflib.get_close_matches(c, names, n=1) for c in unknown}
            hints = "".join(f" ('{c}': did you mean '{m[0]}'?)" for c, m in close.items() if m)
            raise ConfigError(
                f"config key '{key}.classes' (source '{src['name']}') has value {src['classes']!r}, but "
                f"{unknown} {'is not a class folder' if len(unknown) == 1 else 'are not class folders'} of "
                f"{root}{hints}; allowed: its folders {listed}. Fix the names, or add the folders")
        wanted = set(src["classes"])
        folders = [p for p in folders if p.name in wanted]
        problems = []  # entries outside the selected classes are not the study's
    if not folders:
        raise ConfigError(f"data source '{src['name']}' ({key}.path) at {root} has no class sub-folders; "
                          f"expected {_what_goes_there(src)}")
    return folders, problems


def list_source_files(src: dict, resolved: ResolvedSource, *, key: str = "data.sources") -> SourceListing:
    """Every entry of every selected class folder, in sorted order (``max_per_class`` keeps the first N files)."""
    class_folders, files = _class_folders(src, resolved.path, key=key)
    for folder in class_folders:
        with os.scandir(folder) as it:  # scandir: the file-type check needs no extra stat per file
            entries = [(e, *_entry_problem(e)) for e in sorted(it, key=lambda e: e.name)]
        entries = [x for x in entries if x[1] != "dir"]  # nested folders are not read (as before)
        if src["max_per_class"]:  # the first N entries by name, an unreadable one counting as a bad file does
            entries = entries[: src["max_per_class"]]
        base = folder.absolute()
        files += [_problem(src, folder.name, e, problem, detail) if problem else
                  SourceFile(source=src["name"], folder=folder.name, path=base / e.name,
                             sample_id=f"{src['name']}/{folder.name}/{e.name}")
                  for e, _, problem, detail in entries]
    return SourceListing(source=src["name"], files=files, folders=[f.name for f in class_folders])
