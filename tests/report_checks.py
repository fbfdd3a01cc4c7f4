"""Checks shared by the report tests: numbers trace to results rows, PNGs are valid, figures stay on their
canvas; and hand-made manifests for generated rows."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dataset.manifest import write_manifest
from reports.render import FEWSHOT_DETAIL
from study.results import read_rows


def table_after(markdown: str, heading: str) -> list[dict]:
    """The first markdown table after ``heading``, as dicts keyed by header."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    header = _cells(lines[start])
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(header), f"a row of {len(cells)} cells under {len(header)} headers: {line!r}"
        out.append(dict(zip(header, cells)))
    return out


def _cells(line: str) -> list[str]:
    """A markdown table line's cells; an escaped pipe (``\\|``) stays in its cell."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def assert_comparison_traces(run_dir: Path) -> int:
    """Every comparison-table figure equals the results.jsonl row its `row` column names."""
    rows = read_rows(run_dir / "results.jsonl")
    md = (run_dir / "report.md").read_text()
    csv = pd.read_csv(run_dir / "results.csv")
    table = table_after(md, "## Comparison")
    assert table, "the comparison table is empty"
    for cell in table:
        r = rows[int(cell["row"])]
        m = r["metrics"]
        assert cell["backbone"] == r["backbone"] and cell["method"] == r["method"]
        assert cell["features / aug"] == r["feature_set"] and cell["test-time aug"] == r.get("tta", "none")
        # The report's own class-stratified interval (results.csv holds it beside the row's image-level one).
        strat = csv[csv.row == int(cell["row"])].iloc[0]
        lo, hi = strat.mean_per_class_strat_lo, strat.mean_per_class_strat_hi
        assert lo <= m["mean_per_class"] + 1e-12 and m["mean_per_class"] <= hi + 1e-12
        assert cell["mean per-class % [95% class-stratified]"] == f"{pct(m['mean_per_class'])} [{pct(lo)}, {pct(hi)}]"
        lo, hi = m["ci95"]["top1"]
        assert cell["top-1 % [95% CI]"] == f"{pct(m['top1'])} [{pct(lo)}, {pct(hi)}]"
        assert cell["macro-F1 %"] == pct(m["macro_f1"])
        assert cell["train s"] == f"{r['train_s']:.1f}"
        feature_s = r.get("feature_s")
        assert cell["feature extraction s"] == ("–" if feature_s is None else f"{feature_s:.1f}")
        assert cell["inference s"] == f"{r['predict_s']:.1f}"
    traced = {int(c["row"]) for c in table}
    expected = {i for i, r in enumerate(rows) if r["kind"] in ("head", "finetune")}
    assert traced == expected, f"table rows {sorted(traced)} != head/finetune rows {sorted(expected)}"
    # The per-variant few-shot table follows its caption (the arms' table, when both arms have a curve, comes first).
    for cell in table_after(md, FEWSHOT_DETAIL) if FEWSHOT_DETAIL in md else []:
        ids = [int(x) for x in cell["rows"].split(",")]
        values = [rows[i]["metrics"]["mean_per_class"] for i in ids]
        assert all(rows[i]["k_per_class"] == int(cell["k per class"]) for i in ids)
        assert cell["mean per-class % (mean)"] == pct(sum(values) / len(values))
    return len(table)


def assert_pngs_valid(run_dir: Path) -> list[str]:
    md = (run_dir / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert linked, "the report links no figure"
    for name in linked:
        path = run_dir / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.width > 100 and img.height > 100
    return linked


def write_manifest_for(path: Path, labels_by_id: dict[str, int], class_names: list[str], *,
                       sources_by_id: dict[str, str] | None = None, splits: dict[str, str] | None = None) -> Path:
    """A manifest for generated rows (no image behind it: the report reads ids, labels and sources only)."""
    ids = sorted(labels_by_id)
    labels = [labels_by_id[i] for i in ids]
    df = pd.DataFrame({"sample_id": ids, "path": ids, "source": [(sources_by_id or {}).get(i, "gen") for i in ids],
                       "label": labels, "class_name": [class_names[c] for c in labels],
                       "split": [(splits or {}).get(i, "test") for i in ids], "sha256": ids, "width": 1, "height": 1,
                       "mode": "RGB"})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(df, path)
    return path


def predictions(labels: np.ndarray, n_wrong: dict[int, int] | int, rng) -> np.ndarray:
    """``labels`` predicted with ``n_wrong`` images of each class wrong (a dict per class, or one count for all)."""
    pred = labels.copy()
    for c in np.unique(labels):
        k = n_wrong.get(int(c), 0) if isinstance(n_wrong, dict) else n_wrong
        members = np.flatnonzero(labels == c)
        wrong = rng.choice(members, size=min(k, len(members)), replace=False)
        pred[wrong] = (labels[wrong] + 1) % (labels.max() + 1)
    return pred


def assert_on_canvas(fig) -> int:
    """Every visible text and legend of ``fig`` (titles, tick labels, axis labels, annotations, legends) lies
    within the figure's canvas once drawn; returns how many were checked."""
    from matplotlib.legend import Legend
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    hidden = _undrawn_tick_labels(fig)
    checked = 0
    for artist in fig.findobj(lambda a: isinstance(a, (Text, Legend))):
        if not artist.get_visible() or artist in hidden or (isinstance(artist, Text) and not artist.get_text().strip()):
            continue
        box = artist.get_window_extent(renderer)
        what = artist.get_text() if isinstance(artist, Text) else "legend"
        assert canvas.x0 - 1 <= box.x0 and box.x1 <= canvas.x1 + 1, f"{what!r} leaves the canvas sideways: {box}"
        assert canvas.y0 - 1 <= box.y0 and box.y1 <= canvas.y1 + 1, f"{what!r} leaves the canvas: {box}"
        checked += 1
    return checked


def _axes(fig) -> list:
    return [a for ax in fig.axes for a in (ax, *ax.child_axes)]


def _undrawn_tick_labels(fig) -> set:
    """Tick labels matplotlib keeps but does not draw: their ticks lie outside the axis's view interval."""
    hidden = set()
    for ax in _axes(fig):
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * max(hi - lo, 1e-12)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - eps <= tick.get_loc() <= hi + eps:
                    hidden.update({tick.label1, tick.label2})
    return hidden


def tick_labels(ax) -> list[str]:
    """The tick labels an axes draws (ticks inside the view limits), x then y."""
    out = []
    for axis in (ax.xaxis, ax.yaxis):
        lo, hi = sorted(axis.get_view_interval())
        out += [t.label1.get_text() for t in axis.get_major_ticks() if lo - 1e-9 <= t.get_loc() <= hi + 1e-9
                and t.label1.get_visible() and t.label1.get_text()]
    return out
