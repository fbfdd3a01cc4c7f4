"""The extract stage: one shared pass per backbone fills the activation store (``<out>/store/``) with every
(image, view) row the study reads — pooled features for the heads and ``ft:head``, and the activations
at the cut of every configured ``last:k`` fine-tune — computing only the rows no earlier run stored.

Backbones whose weights cannot be had here are recorded in ``skipped.jsonl`` with the exact fix and
skipped; the run goes on. ``<run>/features.json`` lists, per backbone, the pooled store entry (relative
to ``--out``) and the content identity of the feature set the classify stage will read from it.
Under torchrun, every rank computes its share and rank 0 writes the run's files.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dataset.views import study_requests
from extract.backbones import WeightsUnavailable, backbone_spec
from extract.blocks import STACKED_CUT, STACKED_SET
from extract.engine import PassSettings, decode_workers, ensure_rows
from study import distributed
from study.atomic import write_text_atomic
from study.results import append_skip

log = logging.getLogger(__name__)


def pass_settings(cfg: dict, *, device: str) -> PassSettings:
    return PassSettings(device=device, precision=cfg["precision"], storage_dtype=cfg["storage_dtype"],
                        cut_dtype=cfg["cut_dtype"], channels_last=cfg["channels_last"], batch_size=cfg["batch_size"],
                        num_workers=decode_workers(cfg["num_workers"], device=device), progress=True)


def finetune_views(config: dict) -> int:
    """finetune.views resolved: "extract" means the extract stage's count (one views setting for both arms)."""
    views = config["finetune"]["views"]
    return config["extract"]["views"] if views == "extract" else int(views)


def cut_policies(config: dict) -> list[str]:
    """The policies whose cut activations the pass stores: the fine-tunes' (none when they read images) and the
    ``last:1`` cut the heads' ``stages`` feature set pools."""
    ft = config["finetune"]
    policies = list(ft["policies"]) if ft["prefix_cache"] else []
    # The heads' 'stages' feature set pools the last:1 cut: the same pass stores it.
    if STACKED_SET in config.get("classify", {}).get("feature_sets", ()) and STACKED_CUT not in policies:
        policies.append(STACKED_CUT)
    return policies


def requests_of(config: dict, manifest) -> list[tuple[int, int]]:
    """The (manifest row, view) pairs both arms read — the heads' and the fine-tunes' views and test-time
    views — so one pass serves them all."""
    views = max(config["extract"]["views"], finetune_views(config))
    tta = "hflip" if "hflip" in (config["extract"]["tta"], config["finetune"]["tta"]) else config["extract"]["tta"]
    return study_requests(manifest, views=views, tta=tta)


def run(ctx) -> None:
    cfg = ctx.config["extract"]
    distributed.init_from_env()
    names = cfg["backbones"]
    _check_names(names, cfg["weights"])
    manifest = _manifest(ctx)
    requests = requests_of(ctx.config, manifest)
    ft = ctx.config["finetune"]
    for what, head, tune in (("test-time augmentation", cfg["tta"], ft["tta"]),
                             ("augmentation policy", cfg["policy"], ft["augment"])):
        if head != tune:  # the report's comparison is then not like for like: say so where it starts
            log.warning("the arms differ in %s: heads use %r (extract), fine-tunes %r (finetune)", what, head, tune)
    entries = []
    for name in names:
        try:
            result = ensure_rows(manifest=manifest, backbone=name, requests=requests, store_root=ctx.store_dir,
                                 policy=cfg["policy"], view_seed=cfg["view_seed"], policies=cut_policies(ctx.config),
                                 settings=pass_settings(cfg, device=ctx.device), weights_file=cfg["weights"].get(name),
                                 rebuild=ctx.rebuild_cache, data_root=ctx.data_root)
        except WeightsUnavailable as exc:
            log.warning("skipping backbone %s: %s", name, exc)
            if distributed.is_main():
                append_skip(ctx.run_dir, stage="extract", what=f"backbone {name}", reason=exc.reason, fix=exc.fix)
            continue
        pooled = result.stores["pooled"]
        entries.append({"backbone": name, "store": os.path.relpath(pooled.dir, ctx.out_dir),
                        "layers": {n: os.path.relpath(s.dir, ctx.out_dir) for n, s in result.stores.items()},
                        "computed": result.computed, "seconds": round(result.seconds, 2)})
    if distributed.is_main():
        write_text_atomic(ctx.run_dir / "features.json", json.dumps(entries, indent=2) + "\n")


def _manifest(ctx):
    from dataset.manifest import read_manifest

    return read_manifest(ctx.manifest_path)


# A file changed this shortly before its manifest was written may have been hashed before the change.
RACY_NS = 3_000_000_000


def check_images_unchanged(manifest_path: Path, *, data_root) -> None:
    """Refuse a manifest older than its images: a file changed (its ctime or mtime) since the manifest was written
    is hashed again, and one whose bytes no longer hash to the manifest's sha256 is an error naming it. Without
    this, rows stored under the old content would be read for the new image when the dataset stage is skipped."""
    from dataset.manifest import read_manifest
    from dataset.tensors import image_root
    from study.errors import StudyError
    from study.hashing import file_sha256

    written = Path(manifest_path).stat().st_mtime_ns
    root = image_root(data_root)
    manifest = read_manifest(manifest_path)
    for rel, sha in zip(manifest["path"], manifest["sha256"]):
        path = root / rel
        try:
            st = path.stat()
            if max(st.st_mtime_ns, st.st_ctime_ns) < written - RACY_NS or file_sha256(path) == sha:
                continue
            now = "other bytes"
        except OSError as exc:
            now = f"unreadable: {exc.strerror or exc}"
        raise StudyError(f"image {path} changed after the dataset stage wrote {manifest_path} ({now} than the "
                         "manifest records): rerun the dataset stage (add 'dataset' to --stages) so the manifest "
                         "and every result describe the images as they are now")


def _check_names(names: list[str], weights: dict) -> None:
    """Unknown backbone names fail before any work (weights problems are per-backbone skips instead)."""
    unknown_weights = sorted(set(weights) - set(names))
    if unknown_weights:
        raise ValueError(f"config extract.weights names {unknown_weights}, which are not in extract.backbones "
                         f"{names}; fix the name or add the backbone")
    for name in names:
        try:
            backbone_spec(name, pretrained=False)
        except ValueError as exc:
            raise ValueError(f"config extract.backbones: {exc}") from exc
