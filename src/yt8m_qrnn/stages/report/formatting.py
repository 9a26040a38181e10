"""How the report writes numbers, sizes, durations and markdown tables."""
from __future__ import annotations

import math

import pandas as pd

NA = "n/a"
GENERATED_TAG = "generated data: not comparable with the paper"


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def fmt(value, digits: int = 3) -> str:
    return NA if is_missing(value) else f"{float(value):.{digits}f}"


def fmt_seconds(seconds) -> str:
    if is_missing(seconds):
        return NA
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_duration(seconds: float) -> str:
    """A step time: in ms below a second."""
    return f"{1e3 * seconds:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def fmt_rate(rate) -> str:
    return NA if is_missing(rate) else (f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}")


def fmt_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 2**10 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 2**10
    return f"{size} B"


def _cell(value) -> str:
    text = NA if is_missing(value) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def code_list(names) -> str:
    """`a`, `b`, `c`"""
    return ", ".join(f"`{name}`" for name in names)
