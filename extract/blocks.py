"""Unfreeze policies as data, and each architecture's ordered block list.

A backbone is seen as ``units`` (ordered blocks, the first being the stem) followed by a
parameter-light ``tail`` that turns the last unit's output into the pooled (N, D) features.
A policy says how many units, counted from the end, train:

- ``"head"``: none (only the new linear head trains; the tail is frozen too);
- ``"last:k"``: the last k units (and the tail, whose parameters, if any, belong to the trunk's end);
- ``"all"``: every unit;
- ``"probe+last:k"``: two phases, freeze then unfreeze: the new head trains alone on the frozen network (the
  ``head`` policy) until val stops improving, then the last k units train starting from that head (``last:k``).

What a unit is, per architecture (native module names of the library model):

- timm EfficientNet / EfficientNet-Lite: ``conv_stem+bn1`` | ``blocks[0]`` .. ``blocks[6]`` (one unit per
  stage) with ``conv_head+bn2`` joined to the last stage (so ``last:1`` = stage 7 + the 1x1 head conv);
- torchvision ResNet: ``conv1+bn1+relu+maxpool`` | ``layer1`` .. ``layer4``;
- torchvision Inception v3: stem (input transform + Conv2d_* + pools) | ``Mixed_5b`` .. ``Mixed_7c``;
  its ``AuxLogits`` reads ``Mixed_6e``'s output;
- torchvision MobileNet v2/v3, EfficientNet, ConvNeXt: ``features[0]`` .. ``features[n-1]``; the tail
  is ``avgpool`` + the stripped ``classifier`` (ConvNeXt's LayerNorm2d, MobileNet v3's hidden layer);
- torchvision ViT: patch embedding + class token + position embedding | ``encoder.layers[i]``
  (``encoder.ln`` and the class-token pick are the tail).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class UnfreezePolicy:
    name: str  # "head" | "last:k" | "all" | "probe+last:k"
    last: int | None  # units that train (in the last phase); None means all
    probe: bool = False  # first train the head alone on the frozen network, then unfreeze

    def n_trainable(self, n_units: int) -> int:
        return n_units if self.last is None else self.last

    @property
    def phases(self) -> tuple[str, ...]:
        """The one-phase policies trained in order: ("head", "last:k") for "probe+last:k", else (name,)."""
        return ("head", f"last:{self.last}") if self.probe else (self.name,)


# The heads' "stages" feature set (classify/stacked.py) pools the activations at this cut, so the shared pass
# stores it whenever that feature set is configured, fine-tuned or not.
STACKED_SET, STACKED_CUT = "stages", "last:1"
ALLOWED = "'head', 'last:k' with k >= 1 (e.g. 'last:2'), 'all', 'probe+last:k' (head first, then last:k)"


def parse_policy(text: str) -> UnfreezePolicy:
    if text == "head":
        return UnfreezePolicy("head", 0)
    if text == "all":
        return UnfreezePolicy("all", None)
    match = re.fullmatch(r"(probe\+)?last:(\d+)", text)
    if match and int(match.group(2)) >= 1:
        return UnfreezePolicy(text, int(match.group(2)), probe=bool(match.group(1)))
    raise ValueError(f"unfreeze policy {text!r}; allowed: {ALLOWED}")


@dataclass
class BlockList:
    arch: str
    units: list[tuple[str, nn.Module]]
    tail: nn.Module
    aux_after: str | None = None  # unit whose output feeds an auxiliary classifier
    aux: nn.Module | None = None


class _Chain(nn.Sequential):
    """A unit made of several native modules, applied in order (they stay registered in the library model too)."""


class _Pool(nn.Module):
    """Global average pool + flatten."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(x), 1)


class _FeaturesTail(nn.Module):
    def __init__(self, pool: nn.Module, classifier: nn.Module, *, flatten_first: bool):
        super().__init__()
        self.pool, self.classifier, self.flatten_first = pool, classifier, flatten_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        return self.classifier(torch.flatten(x, 1) if self.flatten_first else x)


class _InceptionInput(nn.Module):
    """torchvision's Inception v3 re-normalises its input when ``transform_input`` is set; model.forward does it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.transform_input = bool(getattr(model, "transform_input", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transform_input:
            return x
        ch = [x[:, i : i + 1] * (s / 0.5) + (m - 0.5) / 0.5
              for i, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))]
        return torch.cat(ch, 1)


class _VitEmbed(nn.Module):
    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = [vit]  # a list, so the whole ViT is not registered (and counted) twice
        self.conv_proj, self.class_token = vit.conv_proj, vit.class_token
        self.pos_embedding, self.dropout = vit.encoder.pos_embedding, vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vit[0]._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class _VitTail(nn.Module):
    def __init__(self, ln: nn.Module):
        super().__init__()
        self.ln = ln

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)[:, 0]


def _timm_efficientnet(m) -> BlockList:
    units = [("stem", _Chain(m.conv_stem, m.bn1))]
    units += [(f"blocks.{i}", b) for i, b in enumerate(m.blocks)]
    name, last = units[-1]
    units[-1] = (f"{name}+conv_head", _Chain(last, m.conv_head, m.bn2))
    return BlockList("timm_efficientnet", units, _Pool(m.global_pool))


def _resnet(m) -> BlockList:
    units = [("stem", _Chain(m.conv1, m.bn1, m.relu, m.maxpool))]
    units += [(f"layer{i}", getattr(m, f"layer{i}")) for i in range(1, 5)]
    return BlockList("resnet", units, _Pool(m.avgpool))


_INCEPTION_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                   "Conv2d_4a_3x3", "maxpool2")
_INCEPTION_MIXED = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                    "Mixed_7a", "Mixed_7b", "Mixed_7c")


def _inception(m) -> BlockList:
    units = [("stem", _Chain(_InceptionInput(m), *(getattr(m, n) for n in _INCEPTION_STEM)))]
    units += [(n, getattr(m, n)) for n in _INCEPTION_MIXED]
    aux = getattr(m, "AuxLogits", None)
    return BlockList("inception_v3", units, _Pool(m.avgpool), aux_after="Mixed_6e" if aux is not None else None,
                     aux=aux)


def _features(arch: str):
    def blocks(m) -> BlockList:
        # The tail is the model's own pooling and (stripped) classifier, so the pooled output equals the
        # backbone's pre-logits: ConvNeXt's LayerNorm2d, MobileNet v3's hidden Linear+Hardswish.
        # MobileNet v2 pools inside its forward (no avgpool module): the same global average pool here.
        pool = getattr(m, "avgpool", None) or nn.AdaptiveAvgPool2d(1)
        tail = _FeaturesTail(pool, m.classifier, flatten_first=arch != "convnext")
        return BlockList(arch, [(f"features.{i}", f) for i, f in enumerate(m.features)], tail)
    return blocks


def _vit(m) -> BlockList:
    units = [("embed", _VitEmbed(m))] + [(f"encoder.layers.{i}", layer) for i, layer in enumerate(m.encoder.layers)]
    return BlockList("vit", units, _VitTail(m.encoder.ln))


def _registry() -> list[tuple[type, object]]:
    import timm.models.efficientnet as timm_eff
    import torchvision.models as tvm

    return [
        (timm_eff.EfficientNet, _timm_efficientnet),
        (tvm.ResNet, _resnet),
        (tvm.Inception3, _inception),
        (tvm.MobileNetV2, _features("mobilenet_v2")),
        (tvm.MobileNetV3, _features("mobilenet_v3")),
        (tvm.EfficientNet, _features("efficientnet_tv")),
        (tvm.ConvNeXt, _features("convnext")),
        (tvm.VisionTransformer, _vit),
    ]


def block_list(model: nn.Module) -> BlockList:
    """The ordered units of a supported library model; an unsupported one is a clear error."""
    for cls, build in _registry():
        if isinstance(model, cls):
            return build(model)
    supported = ", ".join(c.__module__ + "." + c.__name__ for c, _ in _registry())
    raise ValueError(f"fine-tuning does not know the blocks of a {type(model).__name__}; supported: {supported}. "
                     "Add its block list to finetune/unfreeze.py")
