"""Unfreeze policies and block lists: the split net computes the backbone's own features, freezes what it should."""
from __future__ import annotations

import pytest
import torch

from extract.backbones import load_backbone
from extract.blocks import parse_policy
from finetune.model import PolicyNotApplicable, build_split_net, count_params
from pipeline.config import load_config
from study.schema import ConfigError


@pytest.mark.parametrize("text,last", [("head", 0), ("last:1", 1), ("last:12", 12), ("all", None),
                                       ("probe+last:2", 2)])
def test_policy_parsing(text, last):
    assert parse_policy(text).last == last


@pytest.mark.parametrize("bad", ["last:0", "last", "tail:2", "ALL", "last:-1", "probe+head", "probe+last:0"])
def test_bad_policy_is_named(bad):
    with pytest.raises(ValueError, match="allowed"):
        parse_policy(bad)
    with pytest.raises(ConfigError, match=r"finetune\.policies\[0\]"):
        load_config(overrides=[f'finetune.policies=["{bad}"]'])


@pytest.fixture(scope="module")
def inception():
    return load_backbone("inception_v3", pretrained=False)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "inception_v3"])
def test_split_reproduces_backbone_features(name, inception):
    backbone = inception if name == "inception_v3" else load_backbone(name, pretrained=False)
    x = torch.randn(2, 3, 160, 160)  # any size the nets accept; smaller is faster
    with torch.no_grad():
        expected = backbone.model(x)
        for policy in ("head", "last:2"):
            net = build_split_net(backbone, policy=policy, n_classes=3).eval()
            a = net.forward_prefix(x)
            for unit in net.suffix:
                a = unit(a)
            torch.testing.assert_close(net.tail(a), expected)


def test_trainable_parts_follow_policy():
    backbone = load_backbone("efficientnet_lite0", pretrained=False)
    head = build_split_net(backbone, policy="head", n_classes=5)
    last1 = build_split_net(backbone, policy="last:1", n_classes=5)
    assert count_params(head)[0] == 1280 * 5 + 5
    assert last1.suffix_names == ["blocks.6+conv_head"]  # last stage plus the 1x1 head conv and bn2
    assert count_params(last1)[0] > count_params(head)[0]
    assert count_params(last1)[1] == count_params(head)[1]
    assert all(not p.requires_grad for p in last1.prefix.parameters())
    # The backbone itself is not altered by splitting it.
    assert all(p.requires_grad for p in backbone.model.parameters())
    with pytest.raises(PolicyNotApplicable, match=r"has 8: .*last:1\.\.last:8"):
        build_split_net(backbone, policy="last:9", n_classes=5)


def test_prefix_stays_in_eval_mode():
    net = build_split_net(load_backbone("resnet18", pretrained=False), policy="last:1", n_classes=2).train()
    assert net.training and net.suffix[0].training and net.head.training
    assert not any(m.training for m in net.prefix.modules())


def test_inception_aux_head_joins_only_when_its_input_trains(inception):
    backbone = inception
    mixed_6d_out = torch.randn(2, 768, 17, 17)  # what the frozen prefix hands over at 299 px
    assert build_split_net(backbone, policy="last:1", n_classes=4).aux is None
    net = build_split_net(backbone, policy="last:4", n_classes=4).train()  # Mixed_6e .. Mixed_7c
    assert net.suffix_names[0] == "Mixed_6e"
    logits, aux = net.forward_suffix(mixed_6d_out)
    assert logits.shape == aux.shape == (2, 4)
    with torch.no_grad():
        assert not isinstance(net.eval().forward_suffix(mixed_6d_out), tuple)
