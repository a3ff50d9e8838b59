"""Markdown tables for benchmark output, and the stamp line above them (docs/RESULTS.md)."""

from __future__ import annotations

import datetime
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

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


#: The line every benchmark prints above its tables: where, when, on what, and the command.
STAMP = re.compile(
    r"^\*Measured at commit (?P<commit>[0-9a-f]{7,40}\+?) on (?P<date>\d{4}-\d\d-\d\d), "
    r"(?P<machine>[^;]+); torch (?P<torch>\S+): `(?P<command>[^`]+)`\*$",
    re.MULTILINE,
)


def commit() -> str:
    """The checkout's short commit, with ``+`` when tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short=7", "HEAD") or "0000000"
    return head + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    """This machine in words: CPU cores, and the GPU when torch sees one."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {gpu}"


def stamp(argv: list[str] | None = None) -> str:
    """The stamp line (``STAMP``) for this process's command (``argv`` without the script)."""
    import torch

    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    args = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python", str(script), *map(shlex.quote, args)])
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    return (
        f"*Measured at commit {commit()} on {today}, {machine()}; "
        f"torch {torch.__version__.split('+')[0]}: `{command}`*"
    )
