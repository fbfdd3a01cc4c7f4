"""Checks shared by the report tests: numbers trace to results rows, PNGs are valid."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from reports.render import FEWSHOT_DETAIL
from study.results import read_rows


def table_after(markdown: str, heading: str) -> list[dict]:
    """The first markdown table after ``heading``, as dicts keyed by header."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        out.append(dict(zip(header, [c.strip() for c in line.strip("|").split("|")])))
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def assert_comparison_traces(run_dir: Path) -> int:
    """Every comparison-table figure equals the results.jsonl row its `row` column names."""
    rows = read_rows(run_dir / "results.jsonl")
    md = (run_dir / "report.md").read_text()
    table = table_after(md, "## Comparison")
    assert table, "the comparison table is empty"
    for cell in table:
        r = rows[int(cell["row"])]
        m = r["metrics"]
        assert cell["backbone"] == r["backbone"] and cell["method"] == r["method"]
        assert cell["features / aug"] == r["feature_set"] and cell["test-time aug"] == r.get("tta", "none")
        lo, hi = m["ci95"]["mean_per_class"]
        assert cell["mean per-class % [95% CI]"] == f"{pct(m['mean_per_class'])} [{pct(lo)}, {pct(hi)}]"
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
