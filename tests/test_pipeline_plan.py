"""The plan printed before any work: what each backbone computes, fits and fine-tunes."""
import dataclasses
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


def test_the_calibrated_plan_times_every_stage_the_config_runs(tmp_path, tiny_manifest, data_root):
    """Extraction, head searches, fine-tune searches and the report, each from rates measured now; more trials
    take longer, and a stage the config does not run is not counted."""
    config = load_config("configs/quick.toml", overrides=["seeds=[0]"])
    ctx = StudyContext(config=config, data_root=data_root, out_dir=tmp_path, run_dir=tmp_path / "run", device="cpu")
    ctx.dataset_dir.mkdir(parents=True)
    shutil.copy(tiny_manifest, ctx.manifest_path)
    plan = make_plan(ctx.for_seeds(), calibrate=True)
    times = {stage: seconds for stage, seconds, _ in plan.stages}
    assert set(times) == {"extraction", "head searches", "fine-tune searches", "report"}
    assert all(s > 0 for s in times.values()) and plan.lines()[-1].startswith("  total: ~")
    more = load_config("configs/quick.toml", overrides=["seeds=[0]", "tune.trials=12"])
    bigger = make_plan([dataclasses.replace(ctx, config=more)], calibrate=True)
    assert dict((s, t) for s, t, _ in bigger.stages)["fine-tune searches"] > times["fine-tune searches"]
    heads_only = load_config("configs/quick.toml", overrides=["seeds=[0]", 'stages=["dataset", "extract", "classify"]'])
    fewer = make_plan([dataclasses.replace(ctx, config=heads_only)], calibrate=True)
    assert {s for s, _, _ in fewer.stages} == {"extraction", "head searches"}


@pytest.mark.parametrize("backbone, policy, size, precision", [
    ("test_efficientnet", "last:1", 160, "fp32"), ("test_efficientnet", "last:1", 160, "bf16"),
    pytest.param("inception_v3", "last:4", 299, "fp32", marks=pytest.mark.slow)])
def test_the_plan_times_a_fine_tune_step_as_the_trainer_runs_it(monkeypatch, backbone, policy, size, precision):
    """A fine-tune step is timed under the fine-tune's own precision, and a network whose training forward also
    returns aux logits (Inception v3 once Mixed_6e trains) is timed, not dropped from the plan."""
    import torch

    import finetune.train
    import study.precision
    from extract.backbones import load_backbone
    from pipeline.estimate import _policy_rates

    seen, losses, real, real_loss = [], [], study.precision.autocast, finetune.train.training_loss
    monkeypatch.setattr(study.precision, "autocast", lambda p, d: (seen.append((p, torch.is_grad_enabled())),
                                                                   real(p, d))[1])
    monkeypatch.setattr(finetune.train, "training_loss",
                        lambda out, y, **kw: (losses.append((type(out), kw["aux_weight"])), real_loss(out, y, **kw))[1])
    config = load_config("configs/quick.toml", overrides=[f'finetune.precision="{precision}"', "finetune.batch_size=2",
                                                          "finetune.prefix_cache=false"])
    bb = load_backbone(backbone, pretrained=False)
    images = torch.randn(2, 3, size, size)
    train, evaluate = _policy_rates(bb, policy, outputs={}, images=images, config=config, device="cpu",
                                    decode_s=0.0)
    assert train > 0 and evaluate > 0
    # Training steps (grad on) and evaluation steps (grad off) alike ran under the fine-tune's precision ...
    assert set(seen) == {(precision, True), (precision, False)}
    # ... and every training step's loss was the trainer's, with its aux weight (Inception: on a tuple of logits).
    assert losses and {w for _, w in losses} == {config["finetune"]["aux_weight"]}
    assert {t for t, _ in losses} == {tuple if backbone == "inception_v3" else torch.Tensor}
