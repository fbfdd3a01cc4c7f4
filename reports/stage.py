"""Report stage: rebuild report.md, results.csv, summary.csv, per_class.csv, trials.csv and the PNG figures of a run
folder.

Reads only the run's own files (results.jsonl, trials.jsonl, skipped.jsonl, provenance.json, config.resolved.toml)
and the dataset stage's summary.json + manifest; computes no metric.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from dataset.manifest import read_manifest
from reports import plots, plots_classes
from reports.render import ReportInputs, provenance_lines, read_run_inputs, render
from reports.sections import TIMING, timing_text
from reports.tables import N_BOOT, Tables
from study.atomic import write_text_atomic
from study.cells import neutralise_frame
from study.hashing import file_sha256
from study.protocol import RULE
from study.results import read_results, read_skips, read_trials

log = logging.getLogger(__name__)


def build_report(*, run_dir: Path, dataset_dir: Path, title: str, worst_n: int = 10, n_boot: int = N_BOOT,
                 figure_cache: Path | None = None) -> Path:
    """Write the run's tables, figures and report.md; ``figure_cache`` (a folder shared by the runs of one --out)
    keeps each set of figures under the hash of everything they are drawn from, so a rerun with the same rows
    copies them instead of drawing them again."""
    run_dir, dataset_dir = Path(run_dir), Path(dataset_dir)
    results_path = run_dir / "results.jsonl"
    rows = read_results(results_path) if results_path.is_file() else []
    labels, sources = _manifest_maps(dataset_dir / "manifest.csv")
    tables = Tables.from_rows(rows, labels_by_id=labels, sources_by_id=sources, trials=read_trials(run_dir),
                              n_boot=n_boot)
    _write_csv(tables.results, run_dir / "results.csv")
    if not tables.trials.empty:
        _write_csv(tables.trials, run_dir / "trials.csv")
    _write_csv(tables.per_class, run_dir / "per_class.csv")
    _write_csv(tables.variants.drop(columns=["rows"]), run_dir / "summary.csv")
    summary_path = dataset_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    provenance, config = read_run_inputs(run_dir)
    figures = make_figures(tables, dataset_summary=summary, run_dir=run_dir, dataset_dir=dataset_dir,
                           cache=_FigureCache(figure_cache, figure_key(run_dir, dataset_dir, n_boot))
                           if figure_cache else None)
    inputs = ReportInputs(tables=tables, summary=summary, skips=read_skips(run_dir), provenance=provenance,
                          config=config, figures=figures, worst_n=worst_n, run_dir=run_dir)
    _write_decision(tables, run_dir)
    report = run_dir / "report.md"
    write_text_atomic(report, render(inputs, title=title))
    return report


def _write_decision(tables: Tables, run_dir: Path) -> None:
    """``decision.json``: the results row the decision card names, which ``pipeline.predict --variant chosen``
    uses (none, and a stale one removed, when the report can decide nothing)."""
    path = run_dir / "decision.json"
    if tables.card is None:
        path.unlink(missing_ok=True)
        return
    row = tables.card.chosen.first
    write_text_atomic(path, json.dumps({"row": row.index, "backbone": row.backbone, "arm": tables.card.chosen.arm,
                                        "kind": row.kind, "method": row.method, "feature_set": row.feature_set,
                                        "split_seed": row.split_seed, "rule": RULE}, indent=1) + "\n")


def _manifest_maps(manifest: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Every image's label and source by id (the paired statistics read the labels, the per-source table the
    sources; the split seeds share one set of images, so the first seed's manifest serves all); none without a
    manifest."""
    if not manifest.is_file():
        return {}, {}
    df = read_manifest(manifest)
    return dict(zip(df.sample_id, df.label.astype(int))), dict(zip(df.sample_id, df.source))


def _write_csv(df, path: Path) -> None:
    """A CSV a person may open in a spreadsheet: text cells neutralised (``study.cells``), written whole."""
    write_text_atomic(path, neutralise_frame(df).to_csv(index=False))


def make_figures(t: Tables, *, dataset_summary: dict | None, run_dir: Path, dataset_dir: Path,
                 cache: "_FigureCache | None" = None) -> dict[str, str]:
    """Copy the dataset stage's pictures and save every figure ``draw_figures`` draws (or copy the cached set of
    the same inputs); figure key -> file name."""
    figures = {}
    for key in ("contact_sheet", "augmentations"):
        name = (dataset_summary or {}).get(key)
        if name and (dataset_dir / name).is_file():
            shutil.copyfile(dataset_dir / name, run_dir / f"dataset_{name}")
            figures[key] = f"dataset_{name}"
    cached = cache.copy_to(run_dir) if cache else None
    if cached is not None:
        return {**figures, **cached}
    drawn = {key: plots.save(fig, run_dir / name).name for key, (fig, name) in draw_figures(t).items()}
    if cache:
        cache.keep(run_dir, drawn)
    return {**figures, **drawn}


def figure_key(run_dir: Path, dataset_dir: Path, n_boot: int) -> str:
    """The hash of what the figures are drawn from: the run's rows and trials, the manifest (labels), the bootstrap
    size, the code that reads and draws them (reports/, study/, dataset/manifest.py), and what turns a drawing into
    pixels (the Python, matplotlib and its rcParams, Pillow, kiwisolver, adjustText, numpy, pandas)."""
    import matplotlib

    h = hashlib.sha256(f"n_boot={n_boot}|python={sys.version}".encode())
    for path in (run_dir / "results.jsonl", run_dir / "trials.jsonl", dataset_dir / "manifest.csv"):
        h.update(f"|{path.name}:".encode() + (path.read_bytes() if path.is_file() else b"absent"))
    here = Path(__file__).resolve().parent
    sources = [*here.glob("*.py"), *(here.parent / "study").glob("*.py"), here.parent / "dataset" / "manifest.py"]
    for src in sorted(sources):
        h.update(f"|{src.parent.name}/{src.name}:".encode() + src.read_bytes())
    for lib in ("matplotlib", "adjustText", "numpy", "pandas", "pillow", "kiwisolver"):
        h.update(f"|{lib}={version(lib)}".encode())
    h.update(repr(sorted((k, repr(v)) for k, v in matplotlib.rcParams.items())).encode())
    return h.hexdigest()


def read_figure_list(folder: Path) -> dict[str, tuple[str, str]]:
    """A figure set's ``figures.json``: figure key -> (file name in ``folder``, sha256); ValueError where it is none."""
    entries = json.loads((folder / "figures.json").read_text())
    ok = isinstance(entries, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) and Path(v[0]).name == v[0]
        for v in entries.values())
    if not ok:
        raise ValueError(f"{folder / 'figures.json'} is not a figure list")
    return {key: (name, digest) for key, (name, digest) in entries.items()}


class _FigureCache:
    """``<root>/<key>/``: one set of PNGs and ``figures.json`` (figure key -> file name, sha256). A set is written
    whole (a temporary folder renamed into place); a set that is malformed, incomplete or whose bytes no longer
    match is a miss, never used; a cache that cannot be read or written costs a redraw, never the report."""

    def __init__(self, root: Path, key: str):
        self.root, self.dir = Path(root), Path(root) / key

    def _entries(self) -> dict[str, str]:
        """The set's figure key -> file name, every file checked against its digest (else an exception)."""
        entries = read_figure_list(self.dir)
        for name, digest in entries.values():
            if file_sha256(self.dir / name) != digest:
                raise ValueError(f"{self.dir / name} does not match its digest")
        return {key: name for key, (name, _) in entries.items()}

    def copy_to(self, run_dir: Path) -> dict[str, str] | None:
        try:
            entries = self._entries()
            for name in entries.values():
                shutil.copyfile(self.dir / name, run_dir / name)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the cache, the figures are drawn again
            if self.dir.exists():
                log.warning("report: the cached figures in %s are unusable (%s); drawing them again", self.dir, exc)
            return None
        log.info("report: figures copied from %s (the same rows, code and libraries drew them)", self.dir)
        return entries

    def keep(self, run_dir: Path, drawn: dict[str, str]) -> None:
        with contextlib.suppress(Exception):
            self._entries()
            return  # another run of the same inputs kept an intact set meanwhile
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
            for name in drawn.values():
                shutil.copyfile(run_dir / name, tmp / name)
            entries = {key: [name, file_sha256(tmp / name)] for key, name in drawn.items()}
            (tmp / "figures.json").write_text(json.dumps(entries, indent=1))
            shutil.rmtree(self.dir, ignore_errors=True)  # a damaged set, which copy_to refused
            os.rename(tmp, self.dir)
        except OSError as exc:  # another run renamed its equal set into place first, a full or read-only disk
            log.info("report: figures not cached (%s)", exc)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def draw_figures(t: Tables) -> dict:
    """Every figure of the report, unsaved: figure key -> (matplotlib figure, file name)."""
    out = {}
    chosen = t.card.chosen.key if t.card is not None else None
    if not t.variants.empty:
        out["accuracy_by_method"] = plots.accuracy_by_method(t.variants), "accuracy_by_method.png"
        ringed = t.variants[[(b, a) in {u.key for u in t.arm_choices.values()}
                             for b, a in zip(t.variants.backbone, t.variants.arm)]]
        out["accuracy_vs_cost"] = plots.cost_figure(t.variants, ringed)[0], "accuracy_vs_cost.png"
    if t.chosen is not None:
        out["confusion"] = plots_classes.confusion(t.chosen), "confusion_best.png"
        out["per_class"] = plots_classes.per_class(t.chosen), "per_class_best.png"
    if not t.anytime.empty:
        out["anytime"] = plots.anytime_curves(t.anytime, chosen=chosen), "anytime.png"
    if t.training_curves:
        picked = {r.index for u in t.arm_choices.values() if u.arm == "finetune" for r in u.rows.values()}
        out["training_curves"] = plots.training_curves(t.training_curves, chosen=picked), "training_curves.png"
    if not t.fewshot_pairs.empty:
        out["fewshot"] = plots.fewshot_differences(t.fewshot_pairs, chosen_backbone=chosen[0] if chosen else None,
                                                   crossovers=t.crossovers), "fewshot.png"
    return out


def record_end(*, run_dir: Path) -> None:
    """Rewrite the report's provenance section from provenance.json once the run has recorded its end.

    The report is the run's last stage, so it is written while the run is still going; run_study
    calls this after ``end_provenance`` so the report says when and how the run ended instead of
    "running", and what the machine's load was while it ran. Only the last section and the Limitations'
    timing line are replaced: no figure is redrawn, no result changes.
    """
    report = Path(run_dir) / "report.md"
    if not report.is_file():
        return
    text = report.read_text()
    head, sep, _ = text.rpartition("## Provenance")
    if not sep:
        return
    provenance, _ = read_run_inputs(Path(run_dir))
    head = re.sub(r"(?m)^- \*\*Timing conditions\*\*: .*$", lambda _: TIMING + timing_text(provenance), head)
    write_text_atomic(report, head + "\n".join(provenance_lines(provenance)).rstrip("\n") + "\n")


def run(ctx) -> None:
    report = build_report(run_dir=ctx.run_dir, dataset_dir=ctx.dataset_dir, title=ctx.config["report"]["title"],
                          worst_n=ctx.config["report"]["worst_classes"], n_boot=ctx.config["report"]["bootstrap"],
                          figure_cache=ctx.out_dir / "figures")
    log.info("report written: %s", report)
