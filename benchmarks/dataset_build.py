#!/usr/bin/env python
"""Dataset build speed: cold (fresh out dir: every image decoded and hashed) vs warm (file-index cache),
plus a rebuild with unchanged inputs (outputs reused), on the merged default dataset
(configs/default.toml [data]: Caltech 101 + Oxford 17 Flowers + Imagenette).

    python benchmarks/dataset_build.py [--data-root ../shared/datasets] [--out out/bench/dataset]

Seconds are measured in-process (after imports). Last line: key=value pairs
(cold_s= warm_s= warm_speedup= reuse_s= n_images= n_classes= n_excluded= n_duplicates= n_exact= n_near=).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dataset.build import build_dataset  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def timed_build(*, data_cfg: dict, data_root: Path, out_dir: Path, reuse: bool):
    start = time.perf_counter()
    build = build_dataset(data_cfg=data_cfg, data_root=data_root, out_dir=out_dir, seed=0, reuse=reuse)
    return build, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--config", default=str(REPO / "configs" / "default.toml"))
    p.add_argument("--out", default=str(REPO / "out" / "bench" / "dataset"), help="emptied first (cold build)")
    args = p.parse_args()
    data_cfg = load_config(args.config)["data"]
    out_dir, data_root = Path(args.out), Path(args.data_root)
    shutil.rmtree(out_dir, ignore_errors=True)

    cold, cold_s = timed_build(data_cfg=data_cfg, data_root=data_root, out_dir=out_dir, reuse=False)
    warm, warm_s = timed_build(data_cfg=data_cfg, data_root=data_root, out_dir=out_dir, reuse=False)
    reused, reuse_s = timed_build(data_cfg=data_cfg, data_root=data_root, out_dir=out_dir, reuse=True)
    assert cold.manifest_hash == warm.manifest_hash == reused.manifest_hash, "a rebuild changed the manifest"
    summary = json.loads(cold.summary_path.read_text())
    kinds = [d["kind"] for d in summary["duplicates"]]

    print(f"{'build':<28}{'seconds':>10}")
    print(f"{'cold (decode + hash all)':<28}{cold_s:>10.1f}")
    print(f"{'warm (file-index cache)':<28}{warm_s:>10.1f}")
    print(f"{'unchanged (outputs reused)':<28}{reuse_s:>10.2f}")
    print(f"{cold.n_images} images, {cold.n_classes} classes, {cold.n_excluded} excluded, "
          f"{kinds.count('exact')} exact + {kinds.count('near')} near duplicates; split {summary['split_counts']}; "
          f"dropped classes {[d['name'] for d in summary['dropped_classes']]}")
    print(f"cold_s={cold_s:.1f} warm_s={warm_s:.1f} warm_speedup={cold_s / warm_s:.1f} reuse_s={reuse_s:.2f} "
          f"n_images={cold.n_images} n_classes={cold.n_classes} n_excluded={cold.n_excluded} "
          f"n_duplicates={cold.n_duplicates} n_exact={kinds.count('exact')} n_near={kinds.count('near')}")


if __name__ == "__main__":
    main()
