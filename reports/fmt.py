"""How the report writes a number, a table and a figure link (``render`` and ``sections`` share them)."""
from __future__ import annotations

import pandas as pd

from study.cells import md_cell


def pct(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{100 * x:.1f}"


def pct_ci(value, lo, hi) -> str:
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return pct(value)
    return f"{pct(value)} [{pct(lo)}, {pct(hi)}]"


def pts(x) -> str:
    """A difference of two fractions in percentage points, signed; a dash where there is none."""
    return "–" if x is None or pd.isna(x) else f"{100 * x:+.1f}"


def pts_ci(value, lo, hi) -> str:
    return f"{pts(value)} [{pts(lo)}, {pts(hi)}]"


def p_text(p) -> str:
    return "–" if p is None or pd.isna(p) else f"{p:.3g}"


def seconds(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{x:.1f}"


def count(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{int(x):,}"


def md_table(header: list[str], body: list[list[str]]) -> list[str]:
    """A markdown table; every cell escaped (``study.cells.md_cell``), so a class name holding ``|`` or a line
    break stays in its cell."""
    lines = ["| " + " | ".join(md_cell(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in body]
    return lines + [""]


def mean_sd(mean, sd, n: int) -> str:
    return pct(mean) if n < 2 else f"{pct(mean)} ± {pct(sd)}"


def figure_links(figures: dict[str, str], **captions: str) -> list[str]:
    """An image link per figure named in ``captions`` (figure key -> caption) that the run drew, in that order."""
    return [line for key, caption in captions.items() if key in figures
            for line in (f"![{caption}]({figures[key]})", "")]


def kind_name(kind: str) -> str:
    return {"head": "frozen features + head", "finetune": "fine-tune"}[kind]


def unit_name(unit) -> str:
    """A (backbone, arm) as the report names it, e.g. `efficientnet_lite0` frozen features + head."""
    return f"`{unit.backbone}` {kind_name(unit.arm)}"
