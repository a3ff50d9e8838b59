"""Markdown tables for benchmark output (pasted into the README as they are)."""

from __future__ import annotations

import math

import pandas as pd


def markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table of ``df`` with floats rounded to ``digits``."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            return f"{v:.{digits}f}"
        return str(v)

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)
