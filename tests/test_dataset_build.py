"""The dataset build on small real subsets: splits, seeds, class mapping, duplicates, too-few classes, reuse."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dataset.build import build_dataset
from dataset.config import SCHEMA
from dataset.dedup import confirmed_near_pairs
from dataset.manifest import read_manifest
from dataset.splits import TooFewImages
from study.schema import validate

pytestmark = pytest.mark.needs_data
CALTECH_CLASSES = ["accordion", "anchor", "barrel", "crab", "sunflower"]


def data_cfg(sources: list[dict], **split) -> dict:
    raw = {"sources": sources, "workers": 1,
           "rename": {"flowers17/sunflower": "sunflower", "caltech101/sunflower": "sunflower"},
           "split": {"protocol": "per_class", "train_per_class": 8, "val_per_class": 2, **split}}
    return validate(raw, SCHEMA)


def caltech(n=16, classes=CALTECH_CLASSES) -> dict:
    return {"name": "caltech101", "kind": "caltech101", "path": "caltech101/101_ObjectCategories",
            "classes": list(classes), "max_per_class": n}


def flowers(n=14, classes=("sunflower", "tulip")) -> dict:
    return {"name": "flowers17", "path": "oxford_flowers17", "classes": list(classes), "max_per_class": n}


@pytest.fixture(scope="module")
def merged(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("merged")
    cfg = data_cfg([caltech(), flowers()])
    build = build_dataset(data_cfg=cfg, data_root=data_root, out_dir=out, seed=0)
    return build, cfg, read_manifest(build.manifest_path), json.loads(build.summary_path.read_text())


def test_splits_are_disjoint_stratified_and_sized(merged):
    build, cfg, df, summary = merged
    assert df["sample_id"].is_unique and df["path"].is_unique
    counts = pd.crosstab(df["class_name"], df["split"])
    assert (counts["train"] == 6).all() and (counts["val"] == 2).all() and (counts["test"] >= 1).all()
    assert summary["split_counts"] == df["split"].value_counts().to_dict()
    assert sorted(df["label"].unique()) == list(range(summary["n_classes"]))


def test_same_concept_across_sources_is_one_class(merged):
    _, _, df, summary = merged
    sunflower = df[df["class_name"] == "sunflower"]
    assert set(sunflower["source"]) == {"caltech101", "flowers17"}
    assert sunflower["label"].nunique() == 1
    record = next(c for c in summary["classes"] if c["name"] == "sunflower")
    assert set(record["sources"]) == {"caltech101", "flowers17"} and record["small"]
    assert summary["n_classes"] == len(CALTECH_CLASSES) + 1  # + tulip


def test_fraction_protocol_is_stratified(data_root, tmp_path):
    cfg = data_cfg([caltech(n=20, classes=CALTECH_CLASSES[:3])], protocol="fraction",
                   train_fraction=0.5, val_fraction=0.25)
    df = read_manifest(build_dataset(data_cfg=cfg, data_root=data_root, out_dir=tmp_path, seed=3).manifest_path)
    counts = pd.crosstab(df["class_name"], df["split"])
    total = counts.sum(axis=1)  # 20 files per class, less any near-copies dropped
    assert (total >= 18).all()
    assert (counts["train"] == (total * 0.5).round()).all() and (counts["val"] == (total * 0.25).round()).all()
    assert (counts["test"] == total - counts["train"] - counts["val"]).all()


def test_same_seed_same_hash_other_seed_other_split(merged, data_root, tmp_path):
    build, cfg, df, _ = merged
    again = build_dataset(data_cfg=cfg, data_root=data_root, out_dir=tmp_path / "a", seed=0)
    other = build_dataset(data_cfg=cfg, data_root=data_root, out_dir=tmp_path / "b", seed=1)
    assert again.manifest_hash == build.manifest_hash
    assert other.manifest_hash != build.manifest_hash
    other_df = read_manifest(other.manifest_path)
    assert set(other_df["sample_id"]) == set(df["sample_id"])  # same images, different draw
    assert (other_df.set_index("sample_id")["split"] != df.set_index("sample_id")["split"]).any()


def test_rebuild_reuses_outputs_and_notices_a_config_change(merged, data_root):
    build, cfg, _, _ = merged
    out = build.manifest_path.parent
    reused = build_dataset(data_cfg=cfg, data_root=data_root, out_dir=out, seed=0)
    assert reused.reused and reused.manifest_hash == build.manifest_hash
    changed = build_dataset(data_cfg={**cfg, "drop": ["crab"]}, data_root=data_root, out_dir=out, seed=0)
    assert not changed.reused and "crab" not in set(read_manifest(changed.manifest_path)["class_name"])
    summary = json.loads(changed.summary_path.read_text())
    assert {"name": "caltech101/crab", "reason": "dropped by config (data.drop: 'crab')"} in summary["dropped_classes"]
    # Restore the module's build for the other tests.
    build_dataset(data_cfg=cfg, data_root=data_root, out_dir=out, seed=0)


def test_too_few_images_is_an_error_or_a_recorded_drop(data_root, tmp_path):
    sources = [caltech(n=16, classes=["accordion", "anchor"]), flowers(n=6, classes=["tulip"])]
    with pytest.raises(TooFewImages, match="tulip.*too_few"):
        build_dataset(data_cfg=data_cfg(sources), data_root=data_root, out_dir=tmp_path / "e", seed=0)
    assert not (tmp_path / "e" / "manifest.csv").exists()
    build = build_dataset(data_cfg=data_cfg(sources, too_few="drop"), data_root=data_root, out_dir=tmp_path / "d",
                          seed=0)
    summary = json.loads(build.summary_path.read_text())
    assert [d["name"] for d in summary["dropped_classes"]] == ["tulip"]
    assert "needs at least 9" in summary["dropped_classes"][0]["reason"]
    assert set(read_manifest(build.manifest_path)["class_name"]) == {"accordion", "anchor"}


def _copies_folder(tmp_path: Path, data_root: Path) -> Path:
    """A user folder source: 12 Caltech crabs, plus an exact copy of a Caltech accordion and a resized crab."""
    root = tmp_path / "user"
    crabs = sorted((data_root / "caltech101/101_ObjectCategories/crab").glob("*.jpg"))[20:32]
    (root / "crab").mkdir(parents=True)
    for f in crabs:
        shutil.copy(f, root / "crab" / f.name)
    accordion = data_root / "caltech101/101_ObjectCategories/accordion/image_0001.jpg"
    shutil.copy(accordion, root / "crab" / "copy_of_accordion.jpg")  # exact copy, other source and class
    img = Image.open(crabs[0])
    img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.BICUBIC).save(root / "crab" / "smaller.jpg", quality=80)
    return root


def test_duplicates_are_recorded_and_never_cross_splits(data_root, tmp_path):
    user = {"name": "user", "path": str(_copies_folder(tmp_path, data_root))}
    cfg = data_cfg([caltech(n=16, classes=["accordion", "anchor"]), user], too_few="drop")
    build = build_dataset(data_cfg=cfg, data_root=data_root, out_dir=tmp_path / "out", seed=0)
    dups = pd.read_csv(tmp_path / "out" / "duplicates.csv")
    found = {(r.kept, r.dropped, r.kind) for r in dups.itertuples()}
    assert ("caltech101/accordion/image_0001.jpg", "user/crab/copy_of_accordion.jpg", "exact") in found
    crab0 = sorted(p.name for p in (tmp_path / "user" / "crab").glob("image_*.jpg"))[0]
    assert (f"user/crab/{crab0}", "user/crab/smaller.jpg", "near") in found
    df = read_manifest(build.manifest_path)
    assert not {"user/crab/copy_of_accordion.jpg", "user/crab/smaller.jpg"} & set(df["sample_id"])
    assert df["sha256"].is_unique
    index = pd.read_csv(tmp_path / "out" / "file_index.csv", dtype=str, keep_default_na=False).set_index("path")
    hashes = index.loc[[str(data_root / p) if not Path(p).is_absolute() else p for p in df["path"]]]
    assert len(confirmed_near_pairs(hashes, near_distance=6, confirm_distance=16)[0]) == 0
    summary = json.loads(build.summary_path.read_text())
    assert len(summary["duplicates"]) == len(dups) == build.n_duplicates >= 2


def test_same_split_policy_keeps_copies_together(data_root, tmp_path):
    user = {"name": "user", "path": str(_copies_folder(tmp_path, data_root))}
    cfg = data_cfg([caltech(n=16, classes=["accordion", "anchor"]), user], too_few="drop")
    cfg = {**cfg, "dedup": {**cfg["dedup"], "policy": "same_split"}}
    df = read_manifest(build_dataset(data_cfg=cfg, data_root=data_root, out_dir=tmp_path / "o", seed=0).manifest_path)
    dups = pd.read_csv(tmp_path / "o" / "duplicates.csv")
    split = df.set_index("sample_id")["split"]
    assert len(dups) >= 2 and all(split[r.kept] == split[r.dropped] for r in dups.itertuples())
    counts = pd.crosstab(df["class_name"], df["split"])
    assert (counts["train"] == 6).all() and (counts["val"] == 2).all()


def test_summary_holds_what_the_report_reads_and_the_artefacts_exist(merged):
    build, cfg, df, summary = merged
    out = build.manifest_path.parent
    for key in ("sources", "n_classes", "classes", "split_counts", "excluded", "duplicates", "small_class_threshold",
                "dropped_classes", "protocol", "seed", "manifest_hash", "contact_sheet", "augmentations"):
        assert key in summary, key
    assert summary["manifest_hash"] == build.manifest_hash and summary["protocol"] == cfg["split"]
    assert [s["name"] for s in summary["sources"]] == ["caltech101", "flowers17"]
    assert sum(s["n_images"] for s in summary["sources"]) == len(df)
    assert sum(c["total"] for c in summary["classes"]) == len(df)
    for name in ("summary.md", "summary.csv", "excluded.csv", "duplicates.csv", summary["contact_sheet"],
                 summary["augmentations"]):
        assert (out / name).stat().st_size > 0, name
    per_class = pd.read_csv(out / "summary.csv")
    assert per_class.set_index("class_name").loc["sunflower", ["n_caltech101", "n_flowers17"]].min() > 0
    assert "sunflower" in (out / "summary.md").read_text()
