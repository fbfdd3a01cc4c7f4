"""Pieces of the dataset build on their own: pHash search, union-find grouping, class mapping, splits, file index."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest

from dataset import index as file_index
from dataset.classmap import map_classes
from dataset.dedup import find_duplicates, near_pairs
from dataset.splits import assign_splits, keep_groups_together, split_sizes

PER_CLASS = {"protocol": "per_class", "train_per_class": 5, "val_per_class": 2, "too_few": "error"}


def test_vectorised_near_pairs_match_a_plain_loop():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, size=(40, 3)).astype(np.uint64)
    hashes = np.concatenate([base, base ^ flips[:, 0], base ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2]])
    i, j, d = near_pairs(hashes, max_distance=3)
    expected = {(a, b, bin(int(hashes[a]) ^ int(hashes[b])).count("1")) for a in range(len(hashes))
                for b in range(a + 1, len(hashes)) if bin(int(hashes[a]) ^ int(hashes[b])).count("1") <= 3}
    assert set(zip(i.tolist(), j.tolist(), d.tolist())) == expected and len(i) == len(expected) >= 80


def test_groups_keep_their_first_member_and_record_each_drop():
    # a ~ b (near), b ~ c (near, transitively a's group), d == a (exact), e alone.
    far = "ffffffff00000000"
    df = pd.DataFrame({"sample_id": list("abcde"), "sha256": ["s1", "s2", "s3", "s1", "s5"],
                       "phash": ["0000000000000000", "0000000000000003", "000000000000000f", "0000000000000000", far],
                       "phash256": ["0" * 64] * 5})
    keep, table = find_duplicates(df, near_distance=2, confirm_distance=0)
    assert keep.tolist() == [True, False, False, False, True]
    rows = {r.dropped: (r.kept, r.kind, r.distance) for r in table.itertuples()}
    assert rows == {"b": ("a", "near", 2), "c": ("a", "near", 4), "d": ("a", "exact", 0)}
    keep_unconfirmed, _ = find_duplicates(df.assign(phash256=["0" * 64, "f" * 64, "0" * 64, "0" * 64, "0" * 64]),
                                          near_distance=2, confirm_distance=16)
    # b's 256-bit hash refutes both of its 64-bit matches, so b and c (which only matched a through b) stay.
    assert keep_unconfirmed.tolist() == [True, True, True, False, True]


def test_class_mapping_renames_merges_drops_and_reports_unused_keys():
    folders = [("caltech101", "sunflower"), ("flowers17", "sunflower"), ("flowers17", "tulip"), ("caltech101", "crab")]
    final, dropped, unused = map_classes(folders, rename={"caltech101/sunflower": "sunflower", "tulip": "tulips",
                                                         "flowers17/rose": "rose"}, drop=["caltech101/crab"])
    assert final == {("caltech101", "sunflower"): "sunflower", ("flowers17", "sunflower"): "sunflower",
                     ("flowers17", "tulip"): "tulips", ("caltech101", "crab"): None}
    assert [d["name"] for d in dropped] == ["caltech101/crab"]
    assert unused == ["flowers17/rose"]


def test_splits_are_seeded_without_replacement_and_independent_of_listing_order():
    ids = [f"s/c/{k:03d}.jpg" for k in range(20)]
    first = assign_splits(ids, class_name="c", split_cfg=PER_CLASS, seed=7)
    assert first == assign_splits(ids[::-1], class_name="c", split_cfg=PER_CLASS, seed=7)
    assert first != assign_splits(ids, class_name="c", split_cfg=PER_CLASS, seed=8)
    assert sorted(first) == sorted(ids)
    assert pd.Series(first).value_counts().to_dict() == {"test": 15, "train": 3, "val": 2}
    assert assign_splits(ids[:5], class_name="c", split_cfg=PER_CLASS, seed=7) is None  # needs 5 + 1
    assert split_sizes(6, PER_CLASS) == (3, 2, 1)


def test_keep_groups_together_moves_copies_by_swapping_within_their_class():
    split_of = {"a": "train", "b": "test", "c": "test", "d": "train", "e": "val"}
    class_of = dict.fromkeys(split_of, "k")
    moved = keep_groups_together(split_of, copies=[("a", "b")], class_of=class_of)
    assert moved["b"] == "train"
    assert sorted(moved.values()) == sorted(split_of.values())  # per-class split counts unchanged
    with pytest.raises(ValueError, match="no image of class"):
        keep_groups_together({"a": "train", "b": "test"}, copies=[("a", "b")], class_of={"a": "k", "b": "k"})


def test_file_index_rescans_only_new_or_changed_files(tmp_path, monkeypatch, data_root):
    images = sorted((data_root / "caltech101/101_ObjectCategories/anchor").glob("*.jpg"))[:3]
    for f in images:
        shutil.copy(f, tmp_path / f.name)
    paths = sorted(tmp_path.glob("*.jpg"))
    index_path = tmp_path / "index" / "file_index.csv"
    first = file_index.scan_files(paths, index_path=index_path, workers=1)
    assert (first["status"] == "ok").all() and first["path"].tolist() == [str(p) for p in paths]

    scanned = []
    real = file_index.describe_file
    monkeypatch.setattr(file_index, "describe_file", lambda p: scanned.append(p) or real(p))
    again = file_index.scan_files(paths, index_path=index_path, workers=1)
    assert scanned == [] and again.equals(first)
    stat = paths[1].stat()
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    paths[1].write_bytes(b"")  # changed content: must be rescanned, and is now empty
    changed = file_index.scan_files(paths, index_path=index_path, workers=1)
    assert scanned == [str(paths[1])]
    assert changed.set_index("path").loc[str(paths[1]), "status"] == "empty"


def test_parallel_scan_matches_serial_scan(tmp_path, monkeypatch, data_root):
    paths = sorted((data_root / "caltech101/101_ObjectCategories/anchor").glob("*.jpg"))[:12]
    monkeypatch.setattr(file_index, "MIN_PARALLEL", 1)
    parallel = file_index.scan_files(paths, index_path=tmp_path / "p.csv", workers=2)
    serial = file_index.scan_files(paths, index_path=tmp_path / "s.csv", workers=1)
    assert parallel.equals(serial)


def test_the_augmentation_sheet_draws_each_views_pixels_as_the_full_transform_gives_them():
    """The sheet stops each policy's transform at its uint8 image: the same draws and pixels as the full transform
    (to float, normalised) mapped back to bytes, which is what it drew before, at a fraction of the time."""
    import torch
    from PIL import Image

    from dataset.sheets import SHEET_DATA_CONFIG, _uint8_steps
    from dataset.transforms import POLICIES, apply_view, augment_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    mean, std = (torch.tensor(SHEET_DATA_CONFIG[k]).view(3, 1, 1) for k in ("mean", "std"))
    for policy in POLICIES:
        full = augment_transform(SHEET_DATA_CONFIG, policy)
        for view in (1, 2):
            want = apply_view(full, img, seed=3, sample_id="s", view=view).mul(std).add(mean)
            got = apply_view(_uint8_steps(full), img, seed=3, sample_id="s", view=view)
            assert got.dtype == torch.uint8 and got.shape == (3, 224, 224), policy
            assert torch.equal(got, want.clamp(0, 1).mul(255).round().byte()), (policy, view)
    with pytest.raises(ValueError, match="expected ToDtype, Normalize"):
        _uint8_steps(_uint8_steps(full))
