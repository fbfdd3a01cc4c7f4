"""Feature cache file format: validation on read names what is wrong; float16 storage; listing. No model runs here."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from extract.cache import (
    CacheMismatch,
    cache_key,
    cache_path,
    check_cache,
    load_features,
    spec_differences,
    write_cache,
)
from extract.list import list_caches
from extract.list import main as list_main
from study.hashing import canonical_json

N, D = 10, 6


def _spec(**over) -> dict:
    spec = {"format": 1, "backbone": {"name": "toy", "data_config": {"resize": 256}}, "views": 1,
            "policy": {"name": "light"}, "seed": 0, "manifest_hash": "m", "storage_dtype": "float32",
            "precision": "fp32", "channels_last": True, "versions": {"torch": "x"}}
    spec.update(over)
    return spec


def _rows():
    rng = np.random.default_rng(0)
    return {"features": rng.standard_normal((N, D)).astype(np.float32),
            "labels": np.arange(N) % 3, "sample_id": np.array([f"s{i}" for i in range(N)]),
            "view": np.array([0] * 7 + [1] * 3), "split": np.array(["train"] * N)}


def _write(tmp_path, spec=None, rows=None, block_rows=4):
    spec, rows = spec or _spec(), rows or _rows()
    path = cache_path(tmp_path, cache_key(spec))
    feats = rows["features"]
    blocks = ((s, feats[s:s + block_rows]) for s in range(0, N, block_rows))
    write_cache(path, spec=spec, n_rows=N, feature_dim=D, labels=rows["labels"], sample_id=rows["sample_id"],
                view=rows["view"], split=rows["split"], feature_blocks=blocks)
    return path, rows


def test_roundtrip_keeps_rows_and_spec(tmp_path):
    path, rows = _write(tmp_path)
    fs = load_features(path, expected_spec=_spec())
    assert np.array_equal(fs.features, rows["features"]) and fs.features.dtype == np.float32
    assert fs.labels.dtype == np.int64 and np.array_equal(fs.labels, rows["labels"])
    assert fs.sample_id.tolist() == rows["sample_id"].tolist() and fs.view.tolist() == rows["view"].tolist()
    assert fs.key == path.stem == cache_key(_spec()) and fs.spec == json.loads(canonical_json(_spec()))
    with h5py.File(path) as f:
        assert f["features"].chunks is not None and f.attrs["complete"]


def test_float16_storage_reads_back_as_float32(tmp_path):
    path, rows = _write(tmp_path, spec=_spec(storage_dtype="float16"))
    with h5py.File(path) as f:
        assert f["features"].dtype == np.float16
    fs = load_features(path)
    assert fs.features.dtype == np.float32
    assert np.array_equal(fs.features, rows["features"].astype(np.float16).astype(np.float32))


def test_expected_spec_mismatch_names_every_differing_field(tmp_path):
    path, _ = _write(tmp_path)
    other = _spec(seed=1, backbone={"name": "toy", "data_config": {"resize": 292}})
    with pytest.raises(CacheMismatch) as err:
        load_features(path, expected_spec=other)
    msg = str(err.value)
    assert "seed: expected 1, cache has 0" in msg and "backbone.data_config.resize" in msg
    assert "views" not in msg and "--rebuild-cache" in msg


def test_altered_spec_is_detected_by_key(tmp_path):
    path, _ = _write(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["spec_json"] = canonical_json(_spec(views=5))
    with pytest.raises(CacheMismatch, match="hashes to"):
        load_features(path)


def test_incomplete_cache_is_refused(tmp_path):
    path, _ = _write(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(CacheMismatch, match="incomplete"):
        load_features(path)


def test_non_finite_features_are_refused_with_row(tmp_path):
    rows = _rows()
    rows["features"][7, 2] = np.nan
    path, _ = _write(tmp_path, rows=rows)
    with pytest.raises(CacheMismatch, match="non-finite features \\(first at row 7\\)"):
        load_features(path)


def test_row_order_is_checked(tmp_path):
    path, rows = _write(tmp_path)
    ids = rows["sample_id"].copy()
    ids[[2, 3]] = ids[[3, 2]]
    with pytest.raises(CacheMismatch, match="row 2 is \\('s2', view 0\\), expected \\('s3', view 0\\)"):
        check_cache(path, expected_sample_id=ids, expected_view=rows["view"])


def test_not_hdf5_is_a_clear_error(tmp_path):
    path = tmp_path / f"{'0' * 64}.h5"
    path.write_bytes(b"garbage")
    with pytest.raises(CacheMismatch, match="not a readable HDF5 file"):
        load_features(path)


def test_spec_differences_reports_absent_fields():
    assert spec_differences({"a": 1, "b": {"c": 2}}, {"b": {"c": 3}}) == [
        "a: expected 1, cache has '<absent>'", "b.c: expected 2, cache has 3"]


def test_listing_shows_spec_and_size(tmp_path, capsys):
    path, _ = _write(tmp_path)
    (tmp_path / ".deadbeef.parts").mkdir()
    rows = list_caches(tmp_path)
    full = next(r for r in rows if r.get("path") == str(path))
    assert full["backbone"] == "toy" and full["rows"] == N and full["dim"] == D and full["complete"]
    assert any("partial extraction" in r.get("error", "") for r in rows)
    assert list_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert path.stem[:12] in out and "2 cache(s)" in out
