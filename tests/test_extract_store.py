"""The activation store on synthetic rows: keys, durable segments, checksums, digests, identity, locks, listing."""
from __future__ import annotations

import json
import multiprocessing as mp
import time

import numpy as np
import pytest

from extract import list as store_list
from extract.store import Store, StoreDamaged, StoreMissingRows, entry_spec, view_name

BACKBONE = {"name": "toy", "arch": "toy", "weights": "none", "sha256": None, "data_config": {"crop_size": 8}}


def _spec(**changes) -> dict:
    args = {"backbone_spec": BACKBONE, "layer": {"kind": "pooled", "name": "pooled"}, "precision": "fp32",
            "storage_dtype": "float32", "channels_last": True, **changes}
    return entry_spec(**args)


def _rows(n: int, start: int = 0, dim: int = 16):
    keys = [(f"{i:064x}", "clean") for i in range(start, start + n)]
    data = np.random.default_rng(start).standard_normal((n, dim)).astype(np.float32)
    return keys, data


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "store", _spec())
    s.create()
    return s


def test_rows_come_back_in_the_order_asked_from_several_segments(store):
    k1, d1 = _rows(5)
    k2, d2 = _rows(4, start=5)
    store.write_segment(k1, d1, compute_s=1.0)
    store.write_segment(k2, d2, compute_s=2.0)
    wanted = [k2[3], k1[0], k2[0], k1[4]]
    got = store.read(wanted)
    np.testing.assert_array_equal(got, np.stack([d2[3], d1[0], d2[0], d1[4]]))
    index = store.index()
    assert index.missing(wanted + [("f" * 64, "clean")]) == [("f" * 64, "clean")]
    assert index.cost_s(k1) == pytest.approx(1.0) and index.cost_s(k2[:2]) == pytest.approx(1.0)


def test_a_missing_row_is_an_error_naming_the_store(store):
    keys, data = _rows(2)
    store.write_segment(keys, data, compute_s=0.1)
    with pytest.raises(StoreMissingRows, match="lacks 1 of the 2 rows.*run the extract stage"):
        store.read([keys[0], ("a" * 64, "hflip")])


def test_float16_storage_rounds_and_reads_back_as_float32(tmp_path):
    s = Store(tmp_path, _spec(storage_dtype="float16"))
    s.create()
    keys, data = _rows(3)
    s.write_segment(keys, data, compute_s=0.1)
    got = s.read(keys)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, data.astype(np.float16).astype(np.float32))


def test_identity_changes_with_any_row_byte_and_not_with_segmentation(tmp_path):
    keys, data = _rows(6)
    one = Store(tmp_path / "a", _spec())
    one.create()
    one.write_segment(keys, data, compute_s=1.0)
    two = Store(tmp_path / "b", _spec())
    two.create()
    two.write_segment(keys[:2], data[:2], compute_s=1.0)
    two.write_segment(keys[2:], data[2:], compute_s=1.0)
    assert one.identity(keys) == two.identity(keys)
    changed = data.copy()
    changed[4, 7] += 1e-3
    three = Store(tmp_path / "c", _spec())
    three.create()
    three.write_segment(keys, changed, compute_s=1.0)
    assert three.identity(keys) != one.identity(keys)
    assert one.identity(keys[:3]) == three.identity(keys[:3])  # only the rows read count


SPEC_CHANGES = {
    "backbone.weights": {"backbone_spec": {**BACKBONE, "weights": "other"}},
    "layer.name": {"layer": {"kind": "cut", "name": "after:blocks.5", "units": ["stem"]}},
    "precision": {"precision": "bf16"},
    "storage_dtype": {"storage_dtype": "float16"},
    "channels_last": {"channels_last": False},
}


@pytest.mark.parametrize("field", list(SPEC_CHANGES))
def test_each_spec_field_makes_another_entry_and_an_altered_spec_names_it(field, tmp_path):
    base = Store(tmp_path, _spec())
    other = Store(tmp_path, _spec(**SPEC_CHANGES[field]))
    assert other.key != base.key
    base.create()
    (base.dir / "spec.json").write_text(json.dumps(other.spec))  # a spec file edited in place
    with pytest.raises(StoreDamaged, match=rf"altered \(.*{field.replace('.', '[.]')}"):
        base.check_spec()


def test_library_versions_are_part_of_the_key(monkeypatch):
    from extract import store as store_module

    before = Store("x", _spec()).key
    monkeypatch.setattr(store_module, "library_versions", lambda: {"torch": "0.0"})
    assert Store("x", _spec()).key != before


def _corrupt(path, *, offset_fraction: float = 0.5, n: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    at = int(len(raw) * offset_fraction)
    raw[at:at + n] = bytes((b + 1) % 256 for b in raw[at:at + n])  # finite garbage, same size
    path.write_bytes(bytes(raw))


def test_garbage_in_a_data_chunk_fails_its_checksum_naming_the_file(store):
    keys, data = _rows(64, dim=512)  # a segment of 128 KiB: the middle is data
    seg = store.write_segment(keys, data, compute_s=1.0)
    _corrupt(seg, offset_fraction=0.5)
    with pytest.raises(StoreDamaged, match=rf"{seg.name}.*--rebuild-cache"):
        store.read(keys)
    out = store_list.main([str(store.dir.parent), "--verify"])
    assert out == 1


def test_a_truncated_segment_is_damaged_not_a_crash(store):
    keys, data = _rows(8)
    seg = store.write_segment(keys, data, compute_s=1.0)
    seg.write_bytes(seg.read_bytes()[:500])
    with pytest.raises(StoreDamaged, match=seg.name):
        store.index()


@pytest.mark.parametrize("fails", ["building", "renaming"])
def test_a_segment_is_never_visible_half_written(store, monkeypatch, fails):
    """A failing write (ENOSPC, permissions) leaves no segment and no temporary file, and says what to do:
    whether it fails while the segment is built or after its bytes were written, at the rename."""
    import os

    import h5py

    keys, data = _rows(4)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fails == "building":
        monkeypatch.setattr(h5py.File, "create_dataset", full_disk)
    else:
        monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(Exception, match="No space left on device.*free disk space"):
        store.write_segment(keys, data, compute_s=1.0)
    monkeypatch.undo()
    assert store.segments() == [] and not list(store.dir.glob(".*.tmp"))


def _hold_lock(root, spec, seconds, ready):
    s = Store(root, spec)
    with s.lock():
        ready.set()
        time.sleep(seconds)
        keys, data = _rows(3)
        s.write_segment(keys, data, compute_s=0.1)


def test_a_second_writer_waits_for_the_first_then_sees_its_rows(tmp_path):
    spec = _spec()
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, spec, 1.0, ready))
    proc.start()
    assert ready.wait(30)
    s = Store(tmp_path, spec)
    t0 = time.perf_counter()
    with s.lock():
        waited = time.perf_counter() - t0
        assert len(s.index().rows) == 3  # the first writer's rows are there once we hold the lock
    proc.join(30)
    assert waited > 0.5


def test_view_names_separate_policy_seed_and_view():
    light = {"name": "light", "hflip": 0.5}
    names = {view_name(0, policy=light, view_seed=0), view_name(-1, policy=light, view_seed=0),
             view_name(1, policy=light, view_seed=0), view_name(2, policy=light, view_seed=0),
             view_name(1, policy=light, view_seed=1), view_name(1, policy={**light, "hflip": 0.4}, view_seed=0)}
    assert len(names) == 6 and {"clean", "hflip"} <= names
    with pytest.raises(ValueError, match="view -2"):
        view_name(-2, policy=light, view_seed=0)


def test_listing_shows_rows_by_view_kind_and_prune_removes_one_entry(tmp_path, capsys):
    a = Store(tmp_path, _spec())
    a.create()
    keys, data = _rows(4)
    a.write_segment(keys + [(keys[0][0], "hflip")], np.concatenate([data, data[:1]]), compute_s=1.0)
    b = Store(tmp_path, _spec(precision="bf16"))
    b.create()
    rows = {r["key"]: r for r in store_list.list_entries(tmp_path)}
    assert rows[a.key]["clean"] == 4 and rows[a.key]["hflip"] == 1 and rows[a.key]["bytes_per_row"] == 64
    assert rows[b.key]["rows"] == 0
    assert store_list.main([str(tmp_path), "--prune", b.key[:10]]) == 0
    assert not b.dir.exists() and a.dir.exists()
    assert store_list.main([str(tmp_path), "--prune", "zzz"]) == 2
    assert "matches 0 entries" in capsys.readouterr().err
