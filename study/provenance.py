"""What a run records about itself: git sha + dirty flag, command line, package versions, device, times, and what
it cost the machine (peak resident memory of its process tree, wall and per-stage seconds, load average)."""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
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


def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``, over all its threads (a worker pool may be started from any thread)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out


def _pss_bytes(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    return None


def _rss_bytes(pid: int, page: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * page
    return 0


def tree_rss_bytes(root: int | None = None) -> int | None:
    """Resident bytes of ``root`` (this process) and every process below it (DataLoader, joblib workers), from
    /proc; None where there is no /proc. Each process counts its proportional share (PSS) of the pages it shares
    with others (a forked worker's copy-on-write pages), so the sum is what the tree holds; where the kernel gives
    no PSS, its resident set (an upper bound: shared pages count once per process)."""
    root = os.getpid() if root is None else root
    if not os.path.isdir(f"/proc/{root}"):
        return None
    total, todo, seen, page = 0, [root], set(), _page_size()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _pss_bytes(pid) or _rss_bytes(pid, page)
        todo += _children(pid)
    return total


def self_peak_rss_bytes() -> int:
    """This process's own peak resident bytes, from the kernel (kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class ResourceMonitor:
    """Samples the process tree's resident memory in a background thread (every ``interval_s``) and sums the
    seconds of each stage, so a run records what it asked of the machine. ``peak_rss_bytes`` is the largest
    sample, and never less than this process's own peak (which the kernel keeps exactly)."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peak = 0
        self.stage_seconds: dict[str, float] = {}
        self.started = time.perf_counter()
        self.load_start = _load_avg()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)

    def start(self) -> "ResourceMonitor":
        self._sample()
        self._thread.start()
        return self

    def _sample(self) -> None:
        rss = tree_rss_bytes()
        self.peak = max(self.peak, rss or 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @contextlib.contextmanager
    def stage(self, name: str):
        """Add the block's seconds to stage ``name`` (summed over split seeds)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - t0

    def stop(self) -> dict:
        """The record: stop sampling (one last sample) and return the provenance fields."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()
        return {"peak_rss_bytes": max(self.peak, self_peak_rss_bytes()),
                "peak_rss_sampled": tree_rss_bytes() is not None, "sample_interval_s": self.interval_s,
                "wall_s": round(time.perf_counter() - self.started, 3),
                "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
                "load_avg": {"start": self.load_start, "end": _load_avg()}}


def _load_avg() -> float | None:
    """The 1-minute load average (how busy the machine was: other jobs slow every timing of the run)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


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


def end_provenance(*, run_dir: Path, prov: dict, status: str, monitor: ResourceMonitor | None = None) -> None:
    """The end: time, status and, with ``monitor``, the run's peak memory, wall and stage seconds, load average."""
    prov = {**prov, "ended": utc_now(), "status": status, **(monitor.stop() if monitor is not None else {})}
    write_text_atomic(run_dir / "provenance.json", json.dumps(prov, indent=2))
