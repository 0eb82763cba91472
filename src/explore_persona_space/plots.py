"""Figure helpers shared by the orchestrators: one look, PNG + PDF, no display needed.

Matplotlib runs on the Agg backend (pods and CI have no display). Every figure
is saved twice under ``figures/<experiment>/``: a PNG to look at and a PDF for
the write-up. Rates are drawn in percent with their 95% intervals as error bars.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen first

PALETTE = {
    "blue": "#3b6ea8",
    "green": "#4c9a5b",
    "grey": "#8c8c8c",
    "orange": "#d9822b",
    "red": "#b5473a",
    "purple": "#7b5ea7",
    "band": "#f2d16b",
}


def new_figure(width: float = 8.0, height: float = 4.5) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def save_figure(fig: Any, directory: Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` (150 dpi) and ``<stem>.pdf``; close the figure."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.png", directory / f"{stem}.pdf"]
    for path in paths:
        tmp = path.with_name(f".tmp-{path.name}")
        fig.savefig(tmp, dpi=150, format=path.suffix[1:])
        tmp.replace(path)
    plt.close(fig)
    return paths


def rate_bars(
    ax: Any,
    labels: Sequence[str],
    rates: Sequence[float | None],
    cis: Sequence[Sequence[float] | None],
    colors: Sequence[str],
    *,
    annotate: Sequence[str] | None = None,
) -> None:
    """Bars of rates (0-1, drawn in %) with asymmetric CI error bars; a missing rate is an empty slot.

    ``annotate`` puts a short text (e.g. ``k/n``) above each bar.
    """
    xs = range(len(labels))
    heights = [100 * r if r is not None else 0.0 for r in rates]
    lo = [100 * (r - ci[0]) if r is not None and ci else 0.0 for r, ci in zip(rates, cis, strict=True)]
    hi = [100 * (ci[1] - r) if r is not None and ci else 0.0 for r, ci in zip(rates, cis, strict=True)]
    ax.bar(xs, heights, color=colors, edgecolor="black", linewidth=0.5)
    ax.errorbar(xs, heights, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, linewidth=1)
    for x, r, h, err in zip(xs, rates, heights, hi, strict=True):
        text = "n/a" if r is None else (annotate[x] if annotate else f"{h:.1f}%")
        ax.annotate(text, (x, h + err), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("rate (%)")
