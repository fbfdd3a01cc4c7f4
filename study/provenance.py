"""What a run records about itself: git sha + dirty flag, command line, package versions, device, times."""
from __future__ import annotations

import datetime as dt
import functools
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from study.atomic import write_text_atomic

PACKAGES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "h5py", "pandas", "Pillow", "ImageHash")


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_state(repo: Path) -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"sha": None, "dirty": None}


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """HEAD's sha, with ``-dirty`` when tracked files differ from it: the code that computed a result row
    (looked up once a process)."""
    from study.config import REPO_ROOT

    state = git_state(REPO_ROOT)
    return None if not state["sha"] else state["sha"] + ("-dirty" if state["dirty"] else "")


def package_versions(names=PACKAGES) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def start_provenance(*, run_dir: Path, repo: Path, argv: list[str], device: str, write: bool = True) -> dict:
    prov = {
        "git": git_state(repo),
        "argv": list(argv),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": device,
        "started": utc_now(),
        "ended": None,
    }
    if write:
        write_text_atomic(run_dir / "provenance.json", json.dumps(prov, indent=2))
    return prov


def end_provenance(*, run_dir: Path, prov: dict, status: str) -> None:
    prov = {**prov, "ended": utc_now(), "status": status}
    write_text_atomic(run_dir / "provenance.json", json.dumps(prov, indent=2))
