"""Report stage: rebuild report.md, results.csv, per_class.csv and the PNG figures of a run folder.

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
from reports.collect import per_class_table, results_table
from reports.render import ReportInputs, best_overall, main_results, read_run_inputs, render
from study.atomic import write_text_atomic
from study.results import read_rows, read_skips

log = logging.getLogger(__name__)


def build_report(*, run_dir: Path, dataset_dir: Path, title: str, worst_n: int = 10) -> Path:
    run_dir, dataset_dir = Path(run_dir), Path(dataset_dir)
    results_path = run_dir / "results.jsonl"
    rows = read_rows(results_path) if results_path.is_file() else []
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
        best = best_overall(inp.results)
        row = inp.rows[int(best.row)]
        title = f"{best.backbone} {best.method} ({best.feature_set})"
        names = row.get("class_names") or [str(i) for i in range(len(row["metrics"]["confusion"]))]
        figures["confusion"] = plots.confusion(row["metrics"]["confusion"], names, f"Confusion: {title}",
                                               run_dir / "confusion_best.png").name
        figures["per_class"] = plots.per_class_accuracy(inp.per_class[inp.per_class.row == best.row],
                                                        f"Per-class accuracy: {title}",
                                                        run_dir / "per_class_best.png").name
    few = inp.results[inp.results.kind == "fewshot"]
    if not few.empty:
        figures["fewshot"] = plots.fewshot_curves(few, run_dir / "fewshot.png").name
    return figures


def run(ctx) -> None:
    report = build_report(run_dir=ctx.run_dir, dataset_dir=ctx.dataset_dir, title=ctx.config["report"]["title"],
                          worst_n=ctx.config["report"]["worst_classes"])
    log.info("report written: %s", report)
