"""What the Caltech 101 benchmarks share: the standard-protocol manifest of a split seed, and a backbone's store rows.

The manifest is configs/caltech101.toml's (102 classes with background, 30 training images per class of which 5
are val, the rest test), split with the given seed into ``<out>/caltech101/seed-<s>/``. The benchmarks default to
the config's ``dev_seeds``: development stays off the evaluation splits.
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def dev_seeds() -> list[int]:
    from pipeline.config import load_config

    return list(load_config(REPO / "configs" / "caltech101.toml")["dev_seeds"])


def add_protocol_args(p, *, backbone_flag: str, final_help: str) -> None:
    """The command line every tuner benchmark on this protocol takes: data, --out, split seeds, the backbone(s),
    a class subset, config overrides and --final (test scores, never used to choose)."""
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--out", default=str(REPO / "out"), help="the store and caches (a study's --out reuses its rows)")
    p.add_argument("--split-seeds", default="", help="comma-separated split seeds (default: the config's dev_seeds)")
    p.add_argument(backbone_flag, default="efficientnet_lite0")
    p.add_argument("--classes", type=int, default=0, help="keep the N smallest classes (0: all; a quick check)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the default config, e.g. tune.trials=8 (repeatable)")
    p.add_argument("--final", action="store_true", help=final_help)


def split_seeds(text: str) -> list[int]:
    """``--split-seeds 100,101`` (default, ``""``: the config's dev seeds)."""
    return [int(s) for s in text.split(",") if s.strip()] or dev_seeds()


def manifest_path(*, data_root: Path, out: Path, seed: int, classes: int = 0) -> Path:
    """The standard-protocol manifest of split seed ``seed`` (``classes`` > 0: its N smallest classes only)."""
    from dataset.build import build_dataset
    from dataset.manifest import read_manifest, smallest_classes, write_manifest
    from pipeline.config import load_config

    config = load_config(REPO / "configs" / "caltech101.toml")
    build = build_dataset(data_cfg=config["data"], data_root=Path(data_root),
                          out_dir=Path(out) / "caltech101" / f"seed-{seed}", seed=seed)
    if not classes:
        return build.manifest_path
    path = Path(out) / "caltech101" / f"seed-{seed}-{classes}classes" / "manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(smallest_classes(read_manifest(build.manifest_path), classes), path)
    return path


def study_context(*, config: dict, manifest: Path, out: Path, data_root: Path, run_dir: Path, device: str = "cpu"):
    """A StudyContext whose dataset is ``manifest`` (copied into place) and whose caches live under ``out``."""
    import shutil

    from study.context import StudyContext

    ctx = StudyContext(config=config, data_root=Path(data_root), out_dir=Path(out), run_dir=Path(run_dir),
                       device=device, split_seed_dir=f"bench-seed-{config['seed']}")
    ctx.dataset_dir.mkdir(parents=True, exist_ok=True)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    if not ctx.manifest_path.is_file() or ctx.manifest_path.read_bytes() != Path(manifest).read_bytes():
        shutil.copyfile(manifest, ctx.manifest_path)
    return ctx
