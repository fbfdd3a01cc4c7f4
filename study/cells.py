"""Cells of the tables a person opens: a CSV text cell a spreadsheet would run as a formula, and a markdown cell that
would break its table.

A text cell starting with ``=``, ``+``, ``-``, ``@`` (or a tab or carriage return, which some spreadsheets skip
before one) is written with a leading ``'``, the spreadsheet convention for "this is text"; so is one that
already starts with ``'``, so ``restore`` can remove exactly one and a file the study reads back round-trips
exactly. Numbers are never touched: a negative number is a number, not a formula.
"""
from __future__ import annotations

import pandas as pd

TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "'")


def neutralise(value):
    """``value`` as a spreadsheet shows it as text: a string starting with a trigger gets a leading ``'``."""
    return "'" + value if isinstance(value, str) and value.startswith(TRIGGERS) else value


def restore(value):
    """``neutralise`` undone."""
    return value[1:] if isinstance(value, str) and value.startswith("'") else value


def _text_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if df[c].dtype == object or pd.api.types.is_string_dtype(df[c].dtype)]


def neutralise_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with every text cell neutralised (what ``to_csv`` should write for a person to open)."""
    columns = _text_columns(df)
    return df.assign(**{c: df[c].map(neutralise) for c in columns}) if columns else df


def restore_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``neutralise_frame`` undone on a frame read back from CSV."""
    columns = _text_columns(df)
    return df.assign(**{c: df[c].map(restore) for c in columns}) if columns else df


def md_cell(value) -> str:
    """``value`` as one markdown table cell: a ``|`` escaped, line breaks as spaces."""
    return " ".join(str(value).replace("|", "\\|").splitlines()) if value is not None else ""
