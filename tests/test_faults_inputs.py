"""Faults in the config, the inputs and the output folder (issue 12), each tried as a user meets it.

A refused config is one ``error:`` line and exit status 2 before any work, with nothing under
``<out>/runs/``; odd entries in a user folder are listed with a reason, never a crash; an image
changed in place is noticed by its content; a moved ``--out`` is reused; output files get the
umask's permissions. All on a handful of tiny generated (or real) images.
"""
from __future__ import annotations

import json
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
