"""Every kind of bad or unusual file gets its recorded outcome: excluded with a reason, or loaded as RGB."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dataset.build import build_dataset
from dataset.config import SCHEMA
from dataset.images import load_rgb
from dataset.manifest import read_manifest
from study.schema import validate

pytestmark = pytest.mark.needs_data


def noise(seed: int, size=(64, 48)) -> np.ndarray:
    # Smooth random blobs: distinct perceptual hashes, so no generated image is a near-copy of another.
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC))


def write_odd_files(folder: Path, real_jpeg: Path) -> dict[str, str]:
    """Write one file of each kind; return file name -> expected outcome (a reason, or the loaded mode)."""
    folder.mkdir(parents=True)
    (folder / "empty.jpg").write_bytes(b"")
    data = real_jpeg.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("not an image\n")
    (folder / "notes.txt").write_text("a note someone left in a class folder\n")
    shutil.copy(real_jpeg, folder / "no_suffix")  # like Caltech's BACKGROUND_Google/tmp
    Image.fromarray(noise(1)[..., 0]).save(folder / "grey.jpg")
    Image.fromarray(noise(2)).convert("CMYK").save(folder / "cmyk.jpg")
    rgba = np.dstack([noise(3), np.full((48, 64), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(noise(4)[..., 0].astype(np.uint16) * 257).save(folder / "deep16.png")
    palette = Image.fromarray(noise(5)).quantize(16)
    palette.save(folder / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.fromarray(noise(6, size=(80, 40))).save(folder / "rotated.jpg", exif=exif)
    Image.new("1", (8200, 8000)).save(folder / "huge.png")
    return {"empty.jpg": "empty", "truncated.jpg": "corrupt", "text.jpg": "not_an_image",
            "notes.txt": "not_an_image", "huge.png": "too_large", "no_suffix": "RGB", "grey.jpg": "L",
            "cmyk.jpg": "CMYK", "rgba.png": "RGBA", "deep16.png": "I;16", "palette.png": "P", "rotated.jpg": "RGB"}


@pytest.fixture(scope="module")
def odd_build(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("odd")
    real = sorted((data_root / "caltech101/101_ObjectCategories/anchor").glob("*.jpg"))
    expected = write_odd_files(tmp / "user" / "odd", real[0])
    (tmp / "user" / "anchor").mkdir()
    for f in real[1:13]:
        shutil.copy(f, tmp / "user" / "anchor" / f.name)
    raw = {"sources": [{"name": "user", "path": str(tmp / "user")}], "workers": 1,
           "split": {"protocol": "fraction", "train_fraction": 0.5, "val_fraction": 0.0}}
    build = build_dataset(data_cfg=validate(raw, SCHEMA), data_root=data_root, out_dir=tmp / "out", seed=0)
    return build, expected, tmp


def test_every_odd_file_has_its_recorded_outcome(odd_build):
    build, expected, tmp = odd_build
    excluded = pd.read_csv(tmp / "out" / "excluded.csv", keep_default_na=False)
    reasons = {Path(p).name: r for p, r in zip(excluded["path"], excluded["reason"])}
    modes = read_manifest(build.manifest_path).assign(name=lambda d: d["path"].map(lambda p: Path(p).name))
    modes = dict(zip(modes["name"], modes["mode"]))
    outcome = {name: reasons.get(name, modes.get(name, "lost")) for name in expected}
    assert outcome == expected
    summary = json.loads(build.summary_path.read_text())
    assert {Path(e["path"]).name: e["reason"] for e in summary["excluded"]} == reasons
    assert build.n_excluded == 5


def test_exif_rotation_swaps_the_recorded_size(odd_build):
    build, _, tmp = odd_build
    row = read_manifest(build.manifest_path).set_index("sample_id").loc["user/odd/rotated.jpg"]
    assert (row["width"], row["height"]) == (40, 80)
    assert load_rgb(tmp / "user" / "odd" / "rotated.jpg").size == (40, 80)


def test_unusual_modes_load_as_rgb(odd_build):
    _, _, tmp = odd_build
    for name in ("grey.jpg", "cmyk.jpg", "rgba.png", "deep16.png", "palette.png", "no_suffix"):
        img = load_rgb(tmp / "user" / "odd" / name)
        assert img.mode == "RGB", name
    deep = np.asarray(load_rgb(tmp / "user" / "odd" / "deep16.png"))[..., 0]
    assert deep.max() > 200 and np.array_equal(deep, noise(4)[..., 0])  # scaled from 16 bits, not clipped


def test_excluded_files_never_shift_labels(odd_build):
    build, _, _ = odd_build
    df = read_manifest(build.manifest_path)
    assert dict(zip(df["class_name"], df["label"])) == {"anchor": 0, "odd": 1}
    assert (df.groupby("class_name")["label"].nunique() == 1).all()
