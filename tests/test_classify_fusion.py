"""Fused feature sets: two backbones' pooled features of the same rows, concatenated: one more backbone with a
head search of its own. The two tiny test networks' features: fusing is bookkeeping, no accuracy is asserted."""
import dataclasses
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

import classify.stage
from classify.fusion import fuse, fused_name
from study.context import StudyContext
from study.results import read_rows, read_skips, read_trials
from tests.classify_fixtures import (
    EXTRACT_CONFIG,
    small_classify_config,
    small_fewshot_config,
    small_tune_config,
    tiny_features,
)
from tests.conftest import TEST_BACKBONE, TEST_BACKBONE2

pytestmark = pytest.mark.needs_data


A, B = TEST_BACKBONE, TEST_BACKBONE2


@pytest.fixture(scope="module")
def lite0(tmp_path_factory, tiny_manifest):
    return tiny_features(tmp_path_factory, tiny_manifest, backbone=A)


@pytest.fixture(scope="module")
def lite1(tmp_path_factory, tiny_manifest):
    return tiny_features(tmp_path_factory, tiny_manifest, backbone=B)


def test_fused_rows_are_the_parts_side_by_side(lite0, lite1):
    fused = fuse({A: lite0, B: lite1})
    d0 = lite0.features.shape[1]
    assert fused.features.shape == (len(lite0.features), d0 + lite1.features.shape[1])
    np.testing.assert_array_equal(fused.features[:, :d0], lite0.features)
    np.testing.assert_array_equal(fused.features[:, d0:], lite1.features)
    assert fused.extract_s == pytest.approx(lite0.extract_s + lite1.extract_s)  # its cost is its parts'
    assert fused.key not in (lite0.key, lite1.key)
    assert fuse({B: lite1, A: lite0}).key != fused.key  # order is part of it


def test_rows_that_are_not_the_same_pairs_are_refused(lite0, lite1):
    order = np.arange(len(lite1.features))[::-1]
    shuffled = dataclasses.replace(lite1, features=lite1.features[order], sample_id=lite1.sample_id[order],
                                   view=lite1.view[order], labels=lite1.labels[order])
    with pytest.raises(ValueError, match="not the same .sample, view. pairs"):
        fuse({"a": lite0, "b": shuffled})
    with pytest.raises(ValueError, match="at least two backbones"):
        fuse({"a": lite0})


def test_the_stage_searches_the_fused_set_as_one_more_backbone_and_skips_a_missing_part(lite0, lite1, tiny_manifest,
                                                                                        tmp_path):
    out = tmp_path / "out"
    (out / "dataset").mkdir(parents=True)
    shutil.copy(tiny_manifest, out / "dataset" / "manifest.csv")
    run_dir = out / "runs" / "a"
    run_dir.mkdir(parents=True)
    entries = [{"backbone": b, "store": os.path.relpath(fs.path, out)} for b, fs in
               ((A, lite0), (B, lite1))]
    (run_dir / "features.json").write_text(json.dumps(entries))
    cfg = small_classify_config(heads=["lr"], feature_sets=["clean"],
                                fusions=[[A, B], [A, "x"]])
    ctx = StudyContext(config={"seed": 0, "classify": cfg, "tune": small_tune_config(trials=3),
                               "fewshot": small_fewshot_config(k=[]), "extract": EXTRACT_CONFIG},
                       data_root=out, out_dir=out, run_dir=run_dir, device="cpu")
    classify.stage.run(ctx)
    rows = read_rows(ctx.results_path)
    name = fused_name([A, B])
    assert [r["backbone"] for r in rows] == [A, B, name]  # one head each
    rows = {r["backbone"]: r for r in rows}
    dims = lite0.features.shape[1] + lite1.features.shape[1]
    assert rows[name]["trainable_params"] == 4 * dims + 4  # one LR over both backbones' features
    assert rows[name]["feature_s"] == pytest.approx(rows[A]["feature_s"] + rows[B]["feature_s"])
    assert rows[name]["cache_key"] == fuse({A: lite0, B: lite1}).key
    trials = read_trials(run_dir)
    assert sorted(Counter(t.backbone for t in trials).items()) == sorted((b, 3) for b in rows)
    (skip,) = [s for s in read_skips(run_dir) if s["what"].startswith("fused:")]
    assert "['x']" in skip["reason"]
