"""One precision resolver: "auto" means the same for extraction and fine-tuning, on CPUs with and
without native bf16 (the capability check is patched both ways, so this runs alike on either)."""
import pytest
import torch

from study import precision as P


@pytest.fixture(params=[True, False], ids=["native_bf16", "avx2_only"])
def cpu_bf16(request, monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_auto_on_cpu_follows_the_capability(cpu_bf16):
    assert P.resolve_precision("auto", "cpu") == ("bf16" if cpu_bf16 else "fp32")
    assert P.autocast_dtype("auto", "cpu") == (torch.bfloat16 if cpu_bf16 else None)


def test_explicit_names_pass_through_whatever_the_cpu(cpu_bf16):
    assert [P.resolve_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert P.autocast_dtype("fp32", "cpu") is None


def test_auto_on_cuda_is_bf16_or_fp16(monkeypatch):
    monkeypatch.setattr(P, "cuda_has_bf16", lambda: False)
    assert P.resolve_precision("auto", "cuda:0") == "fp16"
    monkeypatch.setattr(P, "cuda_has_bf16", lambda: True)
    assert P.resolve_precision("auto", "cuda") == "bf16"


def test_unknown_precision_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"precision 'half'; allowed: auto, fp32, bf16, fp16"):
        P.resolve_precision("half", "cpu")


def test_autocast_context_runs_in_the_resolved_dtype(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    layer = torch.nn.Linear(4, 3)
    with torch.no_grad(), P.autocast("auto", "cpu"):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    with torch.no_grad(), P.autocast("auto", "cpu"):
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_extraction_and_training_resolve_auto_alike(cpu_bf16, tmp_path):
    """The extraction spec and the trainer's autocast come from the same resolver (they used to differ)."""
    from finetune.train import Trainer

    net = torch.nn.Linear(4, 3)
    net.trainable_parameters = lambda: {"head": list(net.parameters()), "trunk": []}
    trainer = Trainer(net=net, hp={"precision": "auto", "label_smoothing": 0.0}, seed=0, device="cpu",
                      ckpt_dir=tmp_path, run_key="k")
    expected = torch.bfloat16 if cpu_bf16 else None
    assert trainer.amp == expected
    from extract import engine

    assert engine.resolve_precision("auto", "cpu") == ("bf16" if cpu_bf16 else "fp32")
