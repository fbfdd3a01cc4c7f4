"""The dataset stage: build (or reuse) the manifest in ctx.dataset_dir and record dropped classes as skips."""
from __future__ import annotations

import json
import logging

from dataset.build import build_dataset
from study.results import append_skip

log = logging.getLogger(__name__)


def run(ctx) -> None:
    build = build_dataset(data_cfg=ctx.config["data"], data_root=ctx.data_root, out_dir=ctx.dataset_dir, seed=ctx.seed,
                          index_path=ctx.out_dir / "dataset" / "file_index.csv")
    summary = json.loads(build.summary_path.read_text())
    for dropped in summary["dropped_classes"]:
        append_skip(ctx.run_dir, stage="dataset", what=f"class {dropped['name']}", reason=dropped["reason"],
                    fix=dropped.get("fix", "see data.drop / data.split.too_few in the config"))
    log.info("dataset: %d images, %d classes (%d excluded files, %d duplicates dropped)%s; manifest %s (hash %s)",
             build.n_images, build.n_classes, build.n_excluded, build.n_duplicates,
             " [reused]" if build.reused else "", build.manifest_path, build.manifest_hash[:12])
