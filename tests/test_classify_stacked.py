"""The 'stages' feature set: a backbone's pooled features beside the spatial mean of its last:1 cut, from the
store the shared pass filled (real Lite0, the tiny 4-class manifest, fp32 pass)."""
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
from pipeline.config import load_config
from study.context import StudyContext
from study.results import read_rows
from tests.classify_fixtures import small_classify_config

pytestmark = pytest.mark.needs_data
SETTINGS = PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_manifest):
    manifest = read_manifest(tiny_manifest)
    root = tmp_path_factory.mktemp("stages_store")
    result = ensure_rows(manifest=manifest, backbone="efficientnet_lite0", policy="light", view_seed=0,
                         requests=study_requests(manifest, views=1, tta="hflip"), store_root=root,
                         policies=[CUT], settings=SETTINGS)
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


def test_the_classify_stage_offers_stages_to_every_head_and_predict_takes_it(stored, tmp_path, tiny_manifest):
    manifest, root, result = stored
    out = tmp_path / "out"
    run_dir = out / "runs" / "a"
    run_dir.mkdir(parents=True)
    shutil.copytree(root, out / "store")
    ecfg = {"views": 1, "tta": "hflip", "policy": "light", "view_seed": 0}
    cfg = small_classify_config(feature_sets=["clean", STAGES], fewshot={"k": []})
    ctx = StudyContext(config={"seed": 0, "classify": cfg, "extract": ecfg}, data_root=out, out_dir=out,
                       run_dir=run_dir, device="cpu")
    ctx.dataset_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_manifest, ctx.manifest_path)
    rel = {name: os.path.relpath(out / "store" / s.dir.name, out) for name, s in result.stores.items()}
    (run_dir / "features.json").write_text(json.dumps([{"backbone": "efficientnet_lite0", "store": rel["pooled"],
                                                        "layers": rel}]))
    classify.stage.run(ctx)
    rows = read_rows(ctx.results_path)
    by = {(r["method"], r["feature_set"]): r for r in rows}
    assert set(by) == {(m, f) for m in ("lr", "svm", "knn") for f in ("clean", STAGES)}
    assert by[("lr", STAGES)]["trainable_params"] == 4 * (1280 + 192) + 4
    assert by[("lr", STAGES)]["cache_key"] != by[("lr", "clean")]["cache_key"]
    assert by[("lr", STAGES)]["feature_s"] == pytest.approx(by[("lr", "clean")]["feature_s"])
    from pipeline.variant import head_variant

    _, meta = load_head(ctx.heads_dir / by[("lr", STAGES)]["head_key"])
    assert meta["feature_set"] == STAGES
    assert head_variant(ctx.heads_dir / by[("lr", STAGES)]["head_key"]).module.branches[0].net.stages
    # Without the cut in the store, 'stages' is a recorded skip, not a crash.
    (run_dir / "features.json").write_text(json.dumps([{"backbone": "efficientnet_lite0", "store": rel["pooled"],
                                                        "layers": {"pooled": rel["pooled"]}}]))
    classify.stage.run(ctx)
    skips = [json.loads(line) for line in (run_dir / "skipped.jsonl").read_text().splitlines()]
    assert any(s["what"] == f"efficientnet_lite0 {STAGES}" for s in skips)
