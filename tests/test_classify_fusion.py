"""Fused feature sets: two backbones' pooled features of the same rows, concatenated, offered to every head."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import classify.stage
from classify.fusion import fuse, fused_name
from study.context import StudyContext
from study.results import read_rows, read_skips
from tests.classify_fixtures import EXTRACT_CONFIG, small_classify_config, tiny_lite0_features

pytestmark = pytest.mark.needs_data


@pytest.fixture(scope="module")
def lite0(tmp_path_factory, tiny_manifest):
    return tiny_lite0_features(tmp_path_factory, tiny_manifest)


@pytest.fixture(scope="module")
def lite1(tmp_path_factory, tiny_manifest):
    from dataset.manifest import read_manifest
    from dataset.views import study_requests
    from extract.cache import load_feature_set
    from extract.engine import PassSettings, ensure_rows

    manifest = read_manifest(tiny_manifest)
    result = ensure_rows(manifest=manifest, backbone="efficientnet_lite1", policy="light", view_seed=0,
                         requests=study_requests(manifest, views=1, tta="none"),
                         store_root=tmp_path_factory.getbasetemp() / "classify_lite0_store",
                         settings=PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False))
    return load_feature_set(result.stores["pooled"], manifest=manifest, views=1, tta="none", policy="light",
                            view_seed=0)


def test_fused_rows_are_the_parts_side_by_side(lite0, lite1):
    fused = fuse({"efficientnet_lite0": lite0, "efficientnet_lite1": lite1})
    assert fused.features.shape == (len(lite0.features), 1280 + 1280)
    np.testing.assert_array_equal(fused.features[:, :1280], lite0.features)
    np.testing.assert_array_equal(fused.features[:, 1280:], lite1.features)
    assert fused.extract_s == pytest.approx(lite0.extract_s + lite1.extract_s)  # its cost is its parts'
    assert fused.key not in (lite0.key, lite1.key)
    assert fuse({"efficientnet_lite1": lite1, "efficientnet_lite0": lite0}).key != fused.key  # order is part of it


def test_rows_that_are_not_the_same_pairs_are_refused(lite0, lite1):
    order = np.arange(len(lite1.features))[::-1]
    shuffled = dataclasses.replace(lite1, features=lite1.features[order], sample_id=lite1.sample_id[order],
                                   view=lite1.view[order], labels=lite1.labels[order])
    with pytest.raises(ValueError, match="not the same .sample, view. pairs"):
        fuse({"a": lite0, "b": shuffled})
    with pytest.raises(ValueError, match="at least two backbones"):
        fuse({"a": lite0})


def test_the_stage_fits_every_head_on_the_fused_set_and_skips_a_missing_part(lite0, lite1, tiny_manifest,
                                                                              tmp_path):
    out = tmp_path / "out"
    (out / "dataset").mkdir(parents=True)
    shutil.copy(tiny_manifest, out / "dataset" / "manifest.csv")
    run_dir = out / "runs" / "a"
    run_dir.mkdir(parents=True)
    entries = [{"backbone": b, "store": os.path.relpath(fs.path, out)} for b, fs in
               (("efficientnet_lite0", lite0), ("efficientnet_lite1", lite1))]
    (run_dir / "features.json").write_text(json.dumps(entries))
    cfg = small_classify_config(heads=["lr"], feature_sets=["clean"], fewshot={"k": []},
                                fusions=[["efficientnet_lite0", "efficientnet_lite1"], ["efficientnet_lite0", "x"]])
    ctx = StudyContext(config={"seed": 0, "classify": cfg, "extract": EXTRACT_CONFIG}, data_root=out, out_dir=out,
                       run_dir=run_dir, device="cpu")
    classify.stage.run(ctx)
    rows = {r["backbone"]: r for r in read_rows(ctx.results_path)}
    name = fused_name(["efficientnet_lite0", "efficientnet_lite1"])
    assert set(rows) == {"efficientnet_lite0", "efficientnet_lite1", name}
    assert rows[name]["trainable_params"] == 4 * 2560 + 4  # one LR over both backbones' features
    assert rows[name]["feature_s"] == pytest.approx(rows["efficientnet_lite0"]["feature_s"]
                                                    + rows["efficientnet_lite1"]["feature_s"])
    (skip,) = [s for s in read_skips(run_dir) if s["what"].startswith("fused:")]
    assert "['x']" in skip["reason"]
