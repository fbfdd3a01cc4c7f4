"""The plan printed before any work: what each backbone computes, fits and fine-tunes."""
import shutil

import pytest

from pipeline.config import load_config
from pipeline.plan import make_plan
from study.context import StudyContext

pytestmark = pytest.mark.needs_data


def test_plan_lists_fine_tunes_only_for_the_backbones_finetune_backbones_names(tmp_path, tiny_manifest):
    config = load_config("configs/quick.toml", overrides=[
        'extract.backbones=["efficientnet_lite0", "efficientnet_lite1"]',
        'finetune.backbones=["efficientnet_lite1"]', 'finetune.policies=["head", "last:1"]', "seeds=[0]"])
    ctx = StudyContext(config=config, data_root=tmp_path, out_dir=tmp_path, run_dir=tmp_path / "run", device="cpu")
    ctx.dataset_dir.mkdir(parents=True)
    shutil.copy(tiny_manifest, ctx.manifest_path)
    plan = {b.backbone: b for b in make_plan(ctx.for_seeds()).backbones}
    assert plan["efficientnet_lite0"].finetunes == []
    assert plan["efficientnet_lite1"].finetunes == ["head x1 seeds", "last:1 x1 seeds"]
    # Both backbones are still extracted and get a head search (of every head and feature set) per split seed.
    assert plan["efficientnet_lite0"].heads == plan["efficientnet_lite1"].heads == 1
    assert plan["efficientnet_lite0"].to_compute == plan["efficientnet_lite0"].requested > 0
