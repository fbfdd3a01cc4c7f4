"""Report stage: rebuild report.md, results.csv, summary.csv, per_class.csv, trials.csv and the PNG figures of a run
folder.

Reads only the run's own files (results.jsonl, trials.jsonl, skipped.jsonl, provenance.json, config.resolved.toml)
and the dataset stage's summary.json + manifest; computes no metric.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from dataset.manifest import read_manifest
from reports import plots
from reports.collect import SUMMARY_COLUMNS
from reports.render import ReportInputs, provenance_lines, read_run_inputs, render
from reports.tables import Tables
from study.atomic import write_text_atomic
from study.results import read_results, read_skips, read_trials

log = logging.getLogger(__name__)


def build_report(*, run_dir: Path, dataset_dir: Path, title: str, worst_n: int = 10) -> Path:
    run_dir, dataset_dir = Path(run_dir), Path(dataset_dir)
    results_path = run_dir / "results.jsonl"
    rows = read_results(results_path) if results_path.is_file() else []
    tables = Tables.from_rows(rows, labels_by_id=_test_labels(dataset_dir / "manifest.csv"),
                              trials=read_trials(run_dir))
    tables.results.to_csv(run_dir / "results.csv", index=False)
    if not tables.trials.empty:
        tables.trials.to_csv(run_dir / "trials.csv", index=False)
    tables.per_class.to_csv(run_dir / "per_class.csv", index=False)
    tables.variants[SUMMARY_COLUMNS].drop(columns=["rows"]).to_csv(run_dir / "summary.csv", index=False)
    summary_path = dataset_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    provenance, config = read_run_inputs(run_dir)
    figures = make_figures(tables, dataset_summary=summary, run_dir=run_dir, dataset_dir=dataset_dir)
    inputs = ReportInputs(tables=tables, summary=summary, skips=read_skips(run_dir), provenance=provenance,
                          config=config, figures=figures, worst_n=worst_n)
    report = run_dir / "report.md"
    write_text_atomic(report, render(inputs, title=title))
    return report


def _test_labels(manifest: Path) -> dict[str, int]:
    """Every sample's label by id (McNemar reads the test ones); none without a manifest."""
    if not manifest.is_file():
        return {}
    df = read_manifest(manifest)
    return dict(zip(df.sample_id, df.label.astype(int)))


def make_figures(t: Tables, *, dataset_summary: dict | None, run_dir: Path, dataset_dir: Path) -> dict[str, str]:
    figures = {}
    for key in ("contact_sheet", "augmentations"):
        name = (dataset_summary or {}).get(key)
        if name and (dataset_dir / name).is_file():
            shutil.copyfile(dataset_dir / name, run_dir / f"dataset_{name}")
            figures[key] = f"dataset_{name}"
    if not t.main.empty:
        figures["accuracy_by_method"] = plots.accuracy_by_method(t.variants, run_dir / "accuracy_by_method.png").name
        figures["accuracy_vs_cost"] = plots.accuracy_vs_cost(t.variants, t.val_best_per_arm,
                                                             run_dir / "accuracy_vs_cost.png").name
        row = t.chosen.row  # the val-chosen model, the one the error analysis names
        title = f"{row.backbone} {row.method} ({row.feature_set}), chosen on val"
        figures["confusion"] = plots.confusion(row.metrics.confusion, t.chosen.class_names, f"Confusion: {title}",
                                               run_dir / "confusion_best.png").name
        figures["per_class"] = plots.per_class_accuracy(t.chosen.per_class, f"Per-class accuracy: {title}",
                                                        run_dir / "per_class_best.png").name
    if not t.anytime.empty:
        figures["anytime"] = plots.anytime_curves(t.anytime, run_dir / "anytime.png").name
    if t.training_curves:
        figures["training_curves"] = plots.training_curves(t.training_curves, run_dir / "training_curves.png").name
    if not t.fewshot_arms.empty:
        figures["fewshot"] = plots.fewshot_curves(t.fewshot_arms, run_dir / "fewshot.png", crossover=t.crossover).name
    return figures


def record_end(*, run_dir: Path) -> None:
    """Rewrite the report's provenance section from provenance.json once the run has recorded its end.

    The report is the run's last stage, so it is written while the run is still going; run_study
    calls this after ``end_provenance`` so the report says when and how the run ended instead of
    "running". Only the last section is replaced: no figure is redrawn, no number changes.
    """
    report = Path(run_dir) / "report.md"
    if not report.is_file():
        return
    text = report.read_text()
    head, sep, _ = text.rpartition("## Provenance")
    if not sep:
        return
    provenance, _ = read_run_inputs(Path(run_dir))
    write_text_atomic(report, head + "\n".join(provenance_lines(provenance)).rstrip("\n") + "\n")


def run(ctx) -> None:
    report = build_report(run_dir=ctx.run_dir, dataset_dir=ctx.dataset_dir, title=ctx.config["report"]["title"],
                          worst_n=ctx.config["report"]["worst_classes"])
    log.info("report written: %s", report)
