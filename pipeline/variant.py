"""A run's variant as one torch module from images to class probabilities: what ``pipeline.predict`` runs and
``--export`` saves.

A variant is a result row of a run (``<out>/runs/<run>/results.jsonl``); ``chosen`` is the run's headline (the
``chosen_row`` rule). Its row names its artefacts (``ResultRow.keys``): a head's ``<out>/heads/<head_key>/`` (the
fitted pipeline, and in meta.json the features it was fitted on: one backbone's pooled output, ``stages``, or several
backbones' pooled outputs fused), a fine-tune's last refit ``<out>/finetune/fits/<fit key>/``, an ensemble's members
(the fine-tune rows of the same split seed whose run keys its hyperparameters list). Each backbone is loaded as the
run's config names it (its ``extract.weights`` file, if any) and refused unless its spec equals the one the artefact
was trained on. The module takes one normalised image batch per distinct preprocessing (``Variant.inputs``) and
applies the test-time mirror itself where the study did (``tta = "hflip"``).
"""
from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch
from torch import nn

from study.errors import StudyError
from study.hashing import canonical_json, spec_differences
from study.results import ENSEMBLE, ResultRow, fused_parts, read_results, val_best

log = logging.getLogger(__name__)


class VariantError(StudyError):
    """A run, row or artefact that cannot give a model (the message says which and what to do)."""


DECISION_FILE = "decision.json"  # written by the report stage: the row its decision card names


def chosen_row(rows: list[ResultRow], run_dir: Path | None = None) -> ResultRow:
    """The run's chosen variant: the row the report's decision card names (``decision.json``: the declared rule,
    which may pass over the val-best for a cheaper candidate within val noise). A run whose report has not been
    written yet falls back to the val-best row, and says so."""
    candidates = [r for r in rows if r.kind in ("head", "finetune")]
    if not candidates:
        raise VariantError("the run has no head or fine-tune rows: it ended before the classify or finetune stage")
    path = None if run_dir is None else Path(run_dir) / DECISION_FILE
    if path is not None and path.is_file():
        try:
            decision = json.loads(path.read_text())
            index = int(decision["row"])
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise VariantError(f"{path} is unreadable ({exc}): rerun the report stage "
                               "(run_study.py --stages report) or pass --variant ROW") from exc
        row = rows[index] if 0 <= index < len(rows) else None
        named = ("backbone", "kind", "method", "feature_set", "split_seed")
        if row is not None and all(decision.get(k, getattr(row, k)) == getattr(row, k) for k in named):
            return row
        raise VariantError(f"{path} names row {index} ({', '.join(str(decision.get(k)) for k in named)}), which "
                           "is not that row of results.jsonl now: rerun the report stage (run_study.py --stages "
                           "report) or pass --variant ROW")
    log.warning("%s has no %s (its report stage has not run): 'chosen' is the val-best row", run_dir, DECISION_FILE)
    return val_best(candidates)


# ---------------------------------------------------------------------------------------------- modules


class Branch(nn.Module):
    """One backbone's share: ``net`` on input ``index``, averaged with its mirror image where the study did."""

    def __init__(self, net: nn.Module, *, index: int, mirror: bool):
        super().__init__()
        self.net, self.index, self.mirror = net, index, mirror

    def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:
        x = xs[self.index]
        out = self.net(x)
        if self.mirror:
            out = (out + self.net(torch.flip(x, [3]))) / 2
        return out


class HeadModel(nn.Module):
    """A head: its branches' features side by side (one backbone, or a fusion's parts in order), then the head."""

    def __init__(self, branches: list[Branch], head: nn.Module):
        super().__init__()
        self.branches, self.head = nn.ModuleList(branches), head

    def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:
        feats = []
        for branch in self.branches:
            feats.append(branch(xs))
        return self.head(torch.cat(feats, dim=1))


class FinetuneModel(nn.Module):
    """Fine-tunes: each branch's softmax (of its mirror-averaged logits), averaged over the branches (an ensemble)."""

    def __init__(self, branches: list[Branch]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(0)
        for i, branch in enumerate(self.branches):
            p = torch.softmax(branch(xs), dim=1)
            total = p if i == 0 else total + p
        return total / len(self.branches)


class SingleInput(nn.Module):
    """``model(x)`` for a variant with one input (the usual case), ``model([x0, x1])`` otherwise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model([x])


# ---------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    module: nn.Module  # forward(xs: one tensor per input) -> (N, classes) probabilities
    inputs: list[dict]  # per input: the data config (resize, crop, ...) and the backbones that read it
    class_names: list[str]
    tta: str
    calibrated: bool  # False: an SVM's softmax of decision values (a score, not a probability)
    describe: str
    row: ResultRow | None = None
    run_dir: Path | None = None
    artefacts: list[str] = field(default_factory=list)


class _Parts:
    """Backbones loaded once per variant, checked against the spec each artefact was trained on, and the inputs
    (distinct preprocessings) they read."""

    def __init__(self, *, weights: dict, loader=None):
        from extract.backbones import load_backbone

        self.weights, self.load = weights, loader or load_backbone
        self.backbones: dict = {}
        self.inputs: list[dict] = []

    def backbone(self, name: str, *, spec: dict, what: str):
        from extract.backbones import WeightsUnavailable

        if name not in self.backbones:
            try:
                self.backbones[name] = self.load(name, weights_file=self.weights.get(name))
            except WeightsUnavailable as exc:
                raise VariantError(f"{exc}") from exc
            except ValueError as exc:  # an unknown backbone name
                raise VariantError(f"{what} names backbone {name!r}: {exc}") from exc
        bb = self.backbones[name]
        diffs = spec_differences(spec, json.loads(canonical_json(bb.spec)), labels=(f"{what} has", "backbone has"))
        if diffs:
            raise VariantError(f"{what} was trained on features of {spec.get('name', name)!r}, and the backbone "
                               f"{bb.name!r} loaded here differs in: " + "; ".join(diffs) + ". Use the backbone "
                               "(and weights file) it was trained with, or retrain it")
        return bb

    def index(self, bb) -> int:
        """The input ``bb`` reads: one per distinct data config."""
        for i, entry in enumerate(self.inputs):
            if entry["data_config"] == bb.data_config:
                entry["backbones"].append(bb.name)
                return i
        self.inputs.append({"data_config": dict(bb.data_config), "backbones": [bb.name]})
        return len(self.inputs) - 1


def _head_parts(meta: dict, *, head_dir: Path, backbone: str | None) -> list[tuple[str, dict]]:
    """(backbone name, the backbone spec its features came from) per part of a saved head, in feature order."""
    if "backbone" not in meta:
        raise VariantError(f"{head_dir / 'meta.json'} lacks 'backbone' (the backbone its features came from); the "
                           "head folder is incomplete or from other code: rerun the classify stage")
    fs = meta.get("features_spec") or {}
    names = fused_parts(meta["backbone"])
    if len(names) > 1:
        if backbone:
            raise VariantError(f"--backbone {backbone!r}: head {head_dir} reads fused features of {names}; each part's "
                               "backbone is the one its meta.json names")
        parts = fs.get("fused") or {}
        missing = [n for n in names if not isinstance(parts.get(n, {}).get("backbone"), dict)]
        if missing:
            raise VariantError(f"{head_dir / 'meta.json'} does not record the backbone spec of {missing}")
        return [(n, parts[n]["backbone"]) for n in names]
    spec = meta.get("backbone_spec") or fs.get("backbone")
    if not isinstance(spec, dict):
        raise VariantError(f"{head_dir / 'meta.json'} does not record the backbone spec of {meta['backbone']!r}; it "
                           "was written by older code: rerun the classify stage")
    return [(backbone or meta["backbone"], spec)]


def head_variant(head_dir: str | Path, *, weights: dict | None = None, backbone: str | None = None,
                 loader=None) -> Variant:
    """The saved head in ``head_dir`` with the backbone(s) its features came from (``backbone``: load another
    name for a single-backbone head; its spec must still equal the head's)."""
    from classify.export import ExportUnsupported, embed_module, head_module
    from classify.store import load_head

    head_dir = Path(head_dir)
    try:
        model, meta = load_head(head_dir)
    except FileNotFoundError as exc:
        raise VariantError(str(exc)) from exc
    names = meta.get("class_names")
    classes = getattr(model[-1] if hasattr(model, "steps") else model, "classes_", [])
    if not isinstance(names, list) or not names or (len(classes) and max(classes) >= len(names)):
        raise VariantError(f"{head_dir / 'meta.json'} has class_names {names!r}, which do not fit the head's "
                           f"{len(classes)} classes; the head folder is damaged: rerun the classify stage")
    parts, branches = _Parts(weights=weights or {}, loader=loader), []
    stages = meta.get("feature_set") == "stages" or "stages" in (meta.get("features_spec") or {})
    tta = (meta.get("features_spec") or {}).get("tta", "none")
    for name, spec in _head_parts(meta, head_dir=head_dir, backbone=backbone):
        bb = parts.backbone(name, spec=spec, what=f"head {head_dir}")
        branches.append(Branch(embed_module(bb, stages=stages), index=parts.index(bb), mirror=tta == "hflip"))
    try:
        head = head_module(model, n_classes=len(names))
    except ExportUnsupported as exc:
        raise VariantError(f"head {head_dir}: {exc}") from exc
    calibrated = hasattr(model[-1] if hasattr(model, "steps") else model, "predict_proba")
    return Variant(module=HeadModel(branches, head).eval(), inputs=parts.inputs, class_names=names, tta=tta,
                   calibrated=calibrated, artefacts=[str(head_dir)],
                   describe=f"{meta['backbone']} {meta.get('method', '')} head on {meta.get('feature_set', '')}")


def finetune_variant(row: ResultRow, rows: list[ResultRow], *, out_dir: Path, weights: dict | None = None,
                     loader=None) -> Variant:
    """A fine-tune row's scored model, or an ensemble row's members (each its own fine-tune row)."""
    from finetune.export import FitUnusable, finetuned_net, fit_spec

    members = [row] if row.method != ENSEMBLE else _members(row, rows)
    parts, branches, artefacts = _Parts(weights=weights or {}, loader=loader), [], []
    for member in members:
        fits = member.keys.get("fit_keys") or []
        if not fits:
            raise VariantError(f"row {member.index} ({member.backbone} {member.method}) names no fine-tune fit "
                               "(keys.fit_keys); it was written by older code: rerun the study")
        fit_dir = Path(out_dir) / "finetune" / "fits" / fits[-1]
        try:
            bb = parts.backbone(member.backbone, spec=fit_spec(fit_dir)["backbone"], what=f"fine-tune {fit_dir}")
            net = finetuned_net(fit_dir, backbone=bb)
        except FitUnusable as exc:
            raise VariantError(str(exc)) from exc
        branches.append(Branch(net, index=parts.index(bb), mirror=member.tta == "hflip"))
        artefacts.append(str(fit_dir))
    return Variant(module=FinetuneModel(branches).eval(), inputs=parts.inputs, class_names=list(row.class_names),
                   tta=row.tta, calibrated=True, row=row, artefacts=artefacts,
                   describe=f"{row.backbone} {row.method}")


def _members(row: ResultRow, rows: list[ResultRow]) -> list[ResultRow]:
    out = []
    for m in row.hyperparams.get("members", []):
        found = [r for r in rows if r.kind == "finetune" and r.split_seed == row.split_seed
                 and r.keys.get("run_key") == m.get("run_key") and r.method != ENSEMBLE]
        if not found:
            raise VariantError(f"ensemble row {row.index}: its member {m.get('backbone')} {m.get('method')} (run "
                               f"{m.get('run_key')}) is not a row of this run")
        out.append(found[0])
    if len(out) < 2:
        raise VariantError(f"ensemble row {row.index} lists {len(out)} members; an ensemble needs two or more")
    return out


# ---------------------------------------------------------------------------------------------- runs


def read_run(run_dir: str | Path) -> tuple[list[ResultRow], dict]:
    """A run folder's rows and resolved config (a clear error when it is not a finished run folder)."""
    run_dir = Path(run_dir)
    results = run_dir / "results.jsonl"
    if not results.is_file():
        raise VariantError(f"{run_dir} is not a run folder with results (no {results.name}); runs live in "
                           "<out>/runs/<run>/ once the classify or finetune stage has run")
    try:
        rows = read_results(results)
        config = tomllib.loads((run_dir / "config.resolved.toml").read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise VariantError(f"{run_dir} cannot be read ({exc})") from exc
    return rows, config


def pick_row(rows: list[ResultRow], variant: str, run_dir: Path | None = None) -> ResultRow:
    """``chosen`` (the report's decision), or a row's index in results.jsonl (the number the report cites)."""
    if variant == "chosen":
        return chosen_row(rows, run_dir)
    if not variant.isdigit() or not 0 <= int(variant) < len(rows):
        raise VariantError(f"--variant {variant!r}; allowed: 'chosen' or a row number 0..{len(rows) - 1} of "
                           "results.jsonl (a head or fine-tune row)")
    row = rows[int(variant)]
    if row.kind not in ("head", "finetune"):
        raise VariantError(f"--variant {variant}: row {variant} is a {row.kind} row (a fit on a few images per class "
                           "whose model is not kept); choose a head or fine-tune row")
    return row


def load_variant(run_dir: str | Path, *, variant: str = "chosen", weights: dict | None = None,
                 loader=None) -> Variant:
    """The model of ``variant`` in the run folder ``run_dir`` (``<out>/runs/<run>``)."""
    run_dir = Path(run_dir)
    rows, config = read_run(run_dir)
    row = pick_row(rows, variant, run_dir)
    out_dir = run_dir.parent.parent
    weights = {**config.get("extract", {}).get("weights", {}), **(weights or {})}
    if row.kind == "head":
        key = row.keys.get("head_key")
        if not key:
            raise VariantError(f"row {row.index} ({row.backbone} {row.method}) names no head folder (keys.head_key); "
                               "it was written by older code: rerun the study")
        found = head_variant(out_dir / "heads" / key, weights=weights, loader=loader)
        if list(found.class_names) != list(row.class_names):
            raise VariantError(f"{out_dir / 'heads' / key / 'meta.json'} has class_names {found.class_names}, but "
                               f"row {row.index} has {list(row.class_names)}: not the head this row reports")
        found.row = row
    else:
        found = finetune_variant(row, rows, out_dir=out_dir, weights=weights, loader=loader)
    found.run_dir = run_dir
    return found
