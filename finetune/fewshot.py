"""The fine-tune arm's few-shot curve: per backbone, k images per class drawn from train, each (k, draw) searched anew.

A few-shot search is a fine-tune search (finetune/search.py) whose training images are the draw: its
``fewshot.trials`` trials choose policy and settings on the split's val, with the pruner reading val after every
epoch (cheap at small k: an epoch is k images per class), and the chosen one is refit on the draw alone and
scored on test once. The images are drawn exactly as the head arm draws them (``study.protocol.draw_indices``
over the train images in manifest order, same draw seeds: classify/fewshot.py), so at each (k, draw) both arms
see the same labelled images and no other. Rows are ``kind = "fewshot"``; each search is cached like any other.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dataset.manifest import read_manifest
from finetune.search import run_finetune
from study import distributed
from study.protocol import draw_seeds, smallest_class
from study.results import ResultRow, append_skip

log = logging.getLogger(__name__)


def largest_k(manifest_path: Path) -> int:
    """The largest k every class's train images allow."""
    manifest = read_manifest(manifest_path)
    return smallest_class(manifest["label"].to_numpy(np.int64)[manifest["split"].to_numpy() == "train"])


def run_fewshot(*, backbone, config: dict, manifest_path: Path, run_dir: Path | None = None,
                **search) -> list[ResultRow]:
    """The few-shot rows of ``backbone``'s fine-tunes at every k and draw of ``config["fewshot"]`` (rank 0; others
    return []); ``search`` holds run_finetune's other arguments (its ``tune_cfg`` budget is replaced by the
    few-shot one)."""
    few = config["fewshot"]
    largest = largest_k(manifest_path)
    tune_cfg = {**search.pop("tune_cfg"), "trials": few["trials"]}
    rows = []
    for k in few["k"]:
        if k > largest:
            log.warning("few-shot %s k=%d: the smallest class has %d train images", backbone.name, k, largest)
            if run_dir is not None and distributed.is_main():
                append_skip(run_dir, stage="finetune", what=f"{backbone.name} few-shot k={k}",
                            reason=f"the smallest class has {largest} train images",
                            fix=f"lower fewshot.k to at most {largest}")
            continue
        for draw in draw_seeds(config):
            rows += run_finetune(backbone=backbone, manifest_path=manifest_path, tune_cfg=tune_cfg, fewshot=(k, draw),
                                 **search).rows
    return rows
