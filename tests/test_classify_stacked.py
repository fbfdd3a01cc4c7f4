"""The 'stages' feature set: a backbone's pooled features beside the spatial mean of its last:1 cut, from the
store the shared pass filled (real Lite0, the tiny 4-class manifest, fp32 pass)."""
import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch

import classify.stage
from classify.stacked import CUT, STAGES, load_stages_set
from classify.store import load_head
from dataset.manifest import read_manifest
from dataset.views import study_requests
from extract.cache import load_feature_set
from extract.engine import PassSettings, ensure_rows
from extract.stage import cut_policies
from extract.store import Store
from pipeline.config import load_config
from study.context import StudyContext
from study.results import read_rows, read_skips, read_trials
from tests.classify_fixtures import small_classify_config, small_fewshot_config, small_tune_config
from tests.conftest import DATA_ROOT

pytestmark = pytest.mark.needs_data
SETTINGS = PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_manifest):
    manifest = read_manifest(tiny_manifest)
    root = tmp_path_factory.mktemp("stages_store")
    result = ensure_rows(manifest=manifest, backbone="efficientnet_lite0", policy="light", view_seed=0,
                         requests=study_requests(manifest, views=1, tta="hflip"), store_root=root,
                         policies=[CUT], settings=SETTINGS, data_root=DATA_ROOT)
    return manifest, root, result


def test_the_stages_set_is_pooled_beside_the_mean_of_the_cut(stored, data_root):
    from dataset.images import load_rgb
    from dataset.transforms import eval_transform
    from extract.backbones import load_backbone

    manifest, _, result = stored
    fs = load_stages_set(result.stores["pooled"], result.stores[CUT], manifest=manifest, tta="hflip",
                         policy="light", view_seed=0)
    clean = load_feature_set(result.stores["pooled"], manifest=manifest, views=0, tta="hflip", policy="light",
                             view_seed=0)
    assert fs.features.shape == (len(clean.features), 1280 + 192)  # Lite0: blocks.5 gives 192 channels
    assert np.array_equal(fs.features[:, :1280], clean.features) and set(fs.view.tolist()) == {0, -1}
    assert np.array_equal(fs.sample_id, clean.sample_id) and fs.key != clean.key
    assert fs.extract_s == pytest.approx(clean.extract_s)  # one pass made both parts: charged once

    # An independent reference: the 192 extra columns are the spatial mean of blocks.5's output of the image.
    bb = load_backbone("efficientnet_lite0")
    model = bb.model.eval()
    seen = {}
    model.blocks[5].register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))
    for m, view in ((0, 0), (len(manifest) - 1, 0), (len(manifest) // 2, -1)):  # first, last, a mirror
        sample = manifest.iloc[m]
        x = eval_transform(bb.data_config)(load_rgb(data_root / sample["path"]))[None]
        with torch.no_grad():
            model(torch.flip(x, dims=[-1]) if view == -1 else x)
        row = np.flatnonzero((fs.sample_id == sample["sample_id"]) & (fs.view == view))[0]
        ref = seen["x"].mean(dim=(2, 3))[0].numpy()
        np.testing.assert_allclose(fs.features[row, 1280:], ref, rtol=0, atol=5e-3)  # the cut is stored float16


def test_the_pass_stores_the_last1_cut_when_the_heads_ask_for_stages():
    cfg = load_config(overrides=['finetune.policies=["head"]', 'classify.feature_sets=["clean", "stages"]'])
    assert cut_policies(cfg) == ["head", CUT]
    assert cut_policies(load_config(overrides=['finetune.policies=["head"]', 'classify.feature_sets=["clean"]'])) \
        == ["head"]


def _run_stage(out, name, *, cfg, layers: dict, tiny_manifest, pooled: str):
    """The classify stage in run ``name`` over the store entries ``layers`` ({layer: entry folder under out})."""
    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True)
    ecfg = {"views": 1, "tta": "hflip", "policy": "light", "view_seed": 0}
    ctx = StudyContext(config={"seed": 0, "classify": cfg, "tune": small_tune_config(),
                               "fewshot": small_fewshot_config(k=[]), "extract": ecfg},
                       data_root=out, out_dir=out, run_dir=run_dir, device="cpu")
    ctx.dataset_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_manifest, ctx.manifest_path)
    (run_dir / "features.json").write_text(json.dumps([{"backbone": "efficientnet_lite0", "store": pooled,
                                                        "layers": layers}]))
    classify.stage.run(ctx)
    return ctx, read_rows(ctx.results_path)


def test_the_classify_stage_offers_stages_to_the_search_and_predict_takes_it(stored, tmp_path, tiny_manifest):
    manifest, root, result = stored
    out = tmp_path / "out"
    shutil.copytree(root, out / "store")
    rel = {name: os.path.relpath(out / "store" / s.dir.name, out) for name, s in result.stores.items()}
    run = functools.partial(_run_stage, out, layers=rel, tiny_manifest=tiny_manifest, pooled=rel["pooled"])
    clean = load_feature_set(Store.open(out / rel["pooled"]), manifest=manifest, views=1, tta="hflip",
                             policy="light", view_seed=0)
    ctx, (row,) = run("both", cfg=small_classify_config(feature_sets=["clean", STAGES]))
    assert {t.params["feature_set"] for t in read_trials(ctx.run_dir)} == {"clean", STAGES}
    # Both sets read the clean (and mirrored) pooled rows, the cut made in the same pass: charged once.
    assert row["feature_s"] == pytest.approx(clean.cost_s(clean.view <= 0))
    ctx, (row,) = run("stages", cfg=small_classify_config(heads=["lr"], feature_sets=[STAGES]))
    assert row["feature_set"] == STAGES and row["trainable_params"] == 4 * (1280 + 192) + 4
    assert row["cache_key"] != clean.key and row["feature_s"] == pytest.approx(clean.cost_s(clean.view <= 0))
    from pipeline.variant import head_variant

    _, meta = load_head(ctx.heads_dir / row["head_key"])
    assert meta["feature_set"] == STAGES
    assert head_variant(ctx.heads_dir / row["head_key"]).module.branches[0].net.stages
    # Without the cut in the store, 'stages' is a recorded skip, not a crash.
    ctx, rows = run("no-cut", cfg=small_classify_config(feature_sets=["clean", STAGES]),
                    layers={"pooled": rel["pooled"]})
    assert [r["feature_set"] for r in rows] == ["clean"]
    assert any(s["what"] == f"efficientnet_lite0 {STAGES}" for s in read_skips(ctx.run_dir))
