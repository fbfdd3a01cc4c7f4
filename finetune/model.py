"""A backbone split for fine-tuning: frozen prefix -> trainable suffix -> pool -> new linear head.

The prefix keeps ``requires_grad=False`` and stays in eval mode whatever ``train()`` is asked
(its BatchNorm statistics never move), so its output for an input is fixed: that is what lets the
prefix-activation cache stand in for it. With policy ``head`` the pool belongs to the prefix and
the cache holds pooled features.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from extract.blocks import BlockList, UnfreezePolicy, block_list, parse_policy


class PolicyNotApplicable(ValueError):
    """An unfreeze policy asking for more blocks than the architecture has."""


class SplitNet(nn.Module):
    def __init__(self, *, blocks: BlockList, n_trainable: int, feature_dim: int, n_classes: int,
                 dropout: float = 0.0, seed: int = 0):
        super().__init__()
        units = blocks.units
        cut = len(units) - n_trainable
        self.arch = blocks.arch
        self.prefix_names = [name for name, _ in units[:cut]]
        self.suffix_names = [name for name, _ in units[cut:]]
        prefix = [m for _, m in units[:cut]] + ([blocks.tail] if n_trainable == 0 else [])
        self.prefix = nn.Sequential(*prefix)
        self.suffix = nn.ModuleList([m for _, m in units[cut:]])
        self.tail = blocks.tail if n_trainable > 0 else nn.Identity()
        # The auxiliary classifier only matters when the block it reads trains.
        self.aux_index = self.suffix_names.index(blocks.aux_after) if blocks.aux_after in self.suffix_names else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # scoped: the new heads' initial weights are a function of the seed alone
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, n_classes))
            self.aux = _fresh_aux(blocks.aux, n_classes) if self.aux_index is not None else None
        for p in self.parameters():
            p.requires_grad_(True)
        for p in self.prefix.parameters():
            p.requires_grad_(False)
        self.prefix.eval()

    def train(self, mode: bool = True) -> "SplitNet":
        super().train(mode)
        self.prefix.eval()
        return self

    @torch.no_grad()
    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix(x)

    def forward_suffix(self, a: torch.Tensor):
        """Logits from prefix activations; in training with an aux head, (logits, aux_logits)."""
        aux_logits = None
        for i, unit in enumerate(self.suffix):
            a = unit(a)
            if i == self.aux_index and self.training:
                aux_logits = self.aux(a)
        logits = self.head(self.tail(a))
        return (logits, aux_logits) if aux_logits is not None else logits

    def forward(self, x: torch.Tensor):
        return self.forward_suffix(self.forward_prefix(x))

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups for discriminative learning rates: the trunk's suffix vs the new head(s)."""
        trunk = [p for m in (*self.suffix, self.tail) for p in m.parameters()]
        heads = list(self.head.parameters()) + (list(self.aux.parameters()) if self.aux is not None else [])
        return {"trunk": trunk, "head": heads}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """State of everything that can change in training (suffix incl. BN buffers, tail, heads)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("prefix.")}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.trainable_state()) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        self.load_state_dict(state, strict=False)


    def head_state(self) -> dict[str, torch.Tensor]:
        """The new linear head's tensors (copies): what a ``probe+last:k`` fine-tune carries from phase 1 to 2."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith("head.")}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the new head to ``state`` (from another split of the same backbone: its head has the same shape)."""
        mine = self.head_state()
        if set(state) != set(mine):
            raise ValueError(f"head state has {sorted(state)}, this net's head {sorted(mine)}")
        self.load_state_dict(state, strict=False)


def _fresh_aux(aux: nn.Module, n_classes: int) -> nn.Module:
    fc = aux.fc
    aux.fc = nn.Linear(fc.in_features, n_classes)
    return aux


def count_params(net: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared modules are counted once."""
    params = {id(p): p for p in net.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def frozen_units(backbone, policy: str | UnfreezePolicy) -> int:
    """How many units ``policy`` keeps frozen in ``backbone`` (0: it trains from images), without building the net
    (a copy of the model costs a second or so: a cached rerun asks this of every policy); PolicyNotApplicable
    when the backbone has fewer units than the policy trains."""
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    blocks = block_list(backbone.model)  # read only: nothing is frozen or re-headed here
    n_units = len(blocks.units)
    if policy.last is not None and policy.last > n_units:
        raise PolicyNotApplicable(f"unfreeze policy {policy.name!r} asks for {policy.last} blocks but {backbone.name} "
                         f"({blocks.arch}) has {n_units}: {[n for n, _ in blocks.units]}; use last:1..last:{n_units}")
    return n_units - policy.n_trainable(n_units)


def build_split_net(backbone, *, policy: str | UnfreezePolicy, n_classes: int, dropout: float = 0.0,
                    seed: int = 0) -> SplitNet:
    """Split ``backbone.model`` (extract.backbones.Backbone) for ``policy`` with a head of ``n_classes`` outputs."""
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    frozen_units(backbone, policy)
    # A copy: the split freezes and re-heads modules, and the caller's backbone must stay as it was.
    blocks = block_list(copy.deepcopy(backbone.model))
    n_units = len(blocks.units)
    return SplitNet(blocks=blocks, n_trainable=policy.n_trainable(n_units), feature_dim=backbone.feature_dim,
                    n_classes=n_classes, dropout=dropout, seed=seed)
