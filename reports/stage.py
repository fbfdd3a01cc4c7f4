"""Report stage: rebuild report.md, results.csv, summary.csv, per_class.csv and the PNG figures of a run folder.

Reads only the run's own files (results.jsonl, skipped.jsonl, provenance.json, config.resolved.toml)
and the dataset stage's summary.json + manifest; computes no metric.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from dataset.manifest import read_manifest
from reports import plots
from reports.collect import fewshot_arms, main_results, paired_gaps, per_class_table, results_table
from reports.render import ReportInputs, chosen_model, read_run_inputs, render, section_provenance
from study.atomic import write_text_atomic
from study.results import read_results, read_skips

log = logging.getLogger(__name__)


def build_report(*, run_dir: Path, dataset_dir: Path, title: str, worst_n: int = 10) -> Path:
    run_dir, dataset_dir = Path(run_dir), Path(dataset_dir)
    results_path = run_dir / "results.jsonl"
    rows = read_results(results_path) if results_path.is_file() else []
    results, per_class = results_table(rows), per_class_table(rows)
    results.to_csv(run_dir / "results.csv", index=False)
    per_class.to_csv(run_dir / "per_class.csv", index=False)
    summary_path = dataset_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    manifest = dataset_dir / "manifest.csv"
    labels_by_id = {}
    if manifest.is_file():
        df = read_manifest(manifest)
        labels_by_id = dict(zip(df.sample_id, df.label.astype(int)))
    provenance, config = read_run_inputs(run_dir)
    inputs = ReportInputs(rows=rows, results=results, per_class=per_class, summary=summary,
                          labels_by_id=labels_by_id, skips=read_skips(run_dir), provenance=provenance,
                          config=config, figures={}, worst_n=worst_n)
    inputs.variants.drop(columns=["rows"]).to_csv(run_dir / "summary.csv", index=False)
    inputs.figures = make_figures(inputs, run_dir=run_dir, dataset_dir=dataset_dir)
    report = run_dir / "report.md"
    write_text_atomic(report, render(inputs, title=title))
    return report


def make_figures(inp: ReportInputs, *, run_dir: Path, dataset_dir: Path) -> dict[str, str]:
    figures = {}
    for key in ("contact_sheet", "augmentations"):
        name = (inp.summary or {}).get(key)
        if name and (dataset_dir / name).is_file():
            shutil.copyfile(dataset_dir / name, run_dir / f"dataset_{name}")
            figures[key] = f"dataset_{name}"
    main = main_results(inp.results)
    if not main.empty:
        figures["accuracy_by_method"] = plots.accuracy_by_method(main, run_dir / "accuracy_by_method.png").name
        figures["accuracy_vs_cost"] = plots.accuracy_vs_cost(main, run_dir / "accuracy_vs_cost.png").name
        row = chosen_model(inp)  # the val-chosen model, the one the error analysis names
        title = f"{row.backbone} {row.method} ({row.feature_set}), chosen on val"
        names = list(row.class_names) or [str(i) for i in range(len(row.metrics.confusion))]
        figures["confusion"] = plots.confusion(row.metrics.confusion, names, f"Confusion: {title}",
                                               run_dir / "confusion_best.png").name
        figures["per_class"] = plots.per_class_accuracy(inp.per_class[inp.per_class.row == row.index],
                                                        f"Per-class accuracy: {title}",
                                                        run_dir / "per_class_best.png").name
    curves = [r for r in inp.rows if r.kind == "finetune" and r.selection is not None and r.selection.curve]
    if curves:
        figures["training_curves"] = plots.training_curves(curves, run_dir / "training_curves.png").name
    arms = fewshot_arms(inp.results, inp.rows)
    if not arms.empty:
        figures["fewshot"] = plots.fewshot_curves(arms, run_dir / "fewshot.png", paired_gaps(inp.results, inp.rows)).name
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
    inputs = ReportInputs(rows=[], results=results_table([]), per_class=per_class_table([]), summary=None,
                          labels_by_id={}, skips=[], provenance=provenance, config={}, figures={})
    write_text_atomic(report, head + "\n".join(section_provenance(inputs)).rstrip("\n") + "\n")


def run(ctx) -> None:
    report = build_report(run_dir=ctx.run_dir, dataset_dir=ctx.dataset_dir, title=ctx.config["report"]["title"],
                          worst_n=ctx.config["report"]["worst_classes"])
    log.info("report written: %s", report)
