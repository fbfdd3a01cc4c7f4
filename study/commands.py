"""The command lines that use what a run chose, as the run's end and its report print them: predict images with a
run's variant, or export it as one file (``python -m pipeline.predict``)."""
from __future__ import annotations

import shlex
from pathlib import Path


def predict_command(run_dir: str | Path, *, row: int | None = None, images: str = "IMAGES_OR_FOLDERS") -> str:
    """Classify images with the run's chosen variant (or results row ``row``)."""
    variant = f" --variant {row}" if row is not None else ""
    return f"python -m pipeline.predict --run {shlex.quote(str(run_dir))}{variant} {images}"


def export_command(run_dir: str | Path, *, row: int | None = None, dest: str = "exported") -> str:
    """Write the run's chosen variant (or row ``row``) as ``dest/model.pt`` + ``dest/preprocessing.json``."""
    variant = f" --variant {row}" if row is not None else ""
    return f"python -m pipeline.predict --run {shlex.quote(str(run_dir))}{variant} --export {shlex.quote(dest)}"
