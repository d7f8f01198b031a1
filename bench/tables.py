"""Markdown tables and number formats shared by the benchmarks' printed reports."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from importlib import metadata


def progress(message: str) -> None:
    """A progress line on stderr; the report itself goes to stdout."""
    print(message, file=sys.stderr, flush=True)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table, columns padded for reading in a terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows,
                                                                         strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths,
                                                                    strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), separator, *(line(row) for row in rows)])


def rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "—"
    return f"{numerator / denominator:.2f}x"


def milliseconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_summary(server_version: str) -> str:
    """One paragraph on what the figures were measured on."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    packages = ", ".join(f"{name} {package_version(name)}" for name in (
        "jobflow", "procrastinate", "pgqueuer", "psycopg", "asyncpg", "SQLAlchemy"))
    return (f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"PostgreSQL {server_version}; {packages}; load average before the run: {load}")
