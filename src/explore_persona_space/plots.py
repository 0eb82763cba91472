"""Figure helpers shared by the orchestrators: one look, PNG + PDF, no display needed.

Matplotlib runs on the Agg backend (pods and CI have no display). Every figure
is saved twice under ``figures/<experiment>/``: a PNG to look at and a PDF for
the write-up. Rates are drawn in percent with their 95% intervals as error bars.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen first

from explore_persona_space.results import atomic_write_bytes

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
    for path in paths:  # rendered in memory, written under a temporary name of its own, renamed into place
        buf = io.BytesIO()
        fig.savefig(buf, dpi=150, format=path.suffix[1:])
        atomic_write_bytes(path, buf.getvalue())
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
    # max(0, ...): a Wilson bound at p = 0 or 1 can miss the rate by a rounding error, on the wrong side
    lo = [
        100 * max(0.0, r - ci[0]) if r is not None and ci else 0.0 for r, ci in zip(rates, cis, strict=True)
    ]
    hi = [
        100 * max(0.0, ci[1] - r) if r is not None and ci else 0.0 for r, ci in zip(rates, cis, strict=True)
    ]
    ax.bar(xs, heights, color=colors, edgecolor="black", linewidth=0.5)
    ax.errorbar(xs, heights, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, linewidth=1)
    for x, r, h, err in zip(xs, rates, heights, hi, strict=True):
        text = "n/a" if r is None else (annotate[x] if annotate else f"{h:.1f}%")
        ax.annotate(text, (x, h + err), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("rate (%)")


# ----------------------------------------------------------------------------- grouped bars in panels
def panels(n: int, width: float = 11.0, height: float = 4.2) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, n, figsize=(width, height), layout="constrained", squeeze=False)
    for ax in axes[0]:
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    return fig, list(axes[0])


def panel_grid(rows: int, cols: int, width: float, height: float) -> tuple[Any, list[list[Any]]]:
    """A rows x cols grid of panels with the house grid lines; ``axes[r][c]``."""
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), layout="constrained", squeeze=False)
    for ax in axes.flat:
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    return fig, [list(row) for row in axes]


def grouped_bars(
    ax: Any,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    cis: Mapping[str, Sequence[Sequence[float] | None]],
    colors: Mapping[str, str],
    *,
    notes: Mapping[str, Sequence[str]] | None = None,
    scale: float = 100.0,
) -> None:
    """One cluster of bars per group, one bar per series; None draws an 'n/a' slot."""
    width = 0.8 / max(1, len(series))
    for j, (label, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        heights = [scale * v if v is not None else 0.0 for v in values]
        lo = [
            scale * max(0.0, v - c[0]) if v is not None and c else 0.0
            for v, c in zip(values, cis[label], strict=True)
        ]
        hi = [
            scale * max(0.0, c[1] - v) if v is not None and c else 0.0
            for v, c in zip(values, cis[label], strict=True)
        ]
        ax.bar(xs, heights, width, color=colors[label], edgecolor="black", linewidth=0.5, label=label)
        ax.errorbar(xs, heights, yerr=[lo, hi], fmt="none", ecolor="black", capsize=2, linewidth=0.8)
        for i, (x, v) in enumerate(zip(xs, values, strict=True)):
            text = notes[label][i] if notes else ("n/a" if v is None else "")
            if v is None:
                text = "n/a"
            if text:
                top = heights[i] + hi[i] if heights[i] >= 0 else 0.0
                ax.annotate(
                    text, (x, top), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=6
                )
    ax.set_xticks(range(len(groups)), groups, fontsize=8)


def legend_below(fig: Any, ax: Any) -> None:
    """One legend under the panels, so it never covers a bar."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False)


# ----------------------------------------------------------------------------- single-marker cell figures
# Each takes one entry per cell: {"label": str, "color": str, ...numbers...}, in display order.


def _cells_axes(cells: Sequence[dict[str, Any]], key: str, title: str, ylabel: str) -> tuple[Any, Any]:
    fig, ax = new_figure(max(6.0, 1.0 * len(cells) + 2.5), 4.8)
    rates = [c[key]["rate"] for c in cells]
    cis = [c[key]["wald"] for c in cells]
    notes = [f"{c[key]['k']}/{c[key]['n']}" for c in cells]
    rate_bars(ax, [c["label"] for c in cells], rates, cis, [c["color"] for c in cells], annotate=notes)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel(ylabel)
    return fig, ax


def bystander_figure(
    cells: Sequence[dict[str, Any]], title: str, band: tuple[float, float, str] | None = None
) -> Any:
    """Mean bystander rate per cell with 95% Wald CIs; ``band`` = (lo, hi, label) shaded as a reference."""
    fig, ax = _cells_axes(cells, "bystander", title, "mean bystander marker rate (%)  ↓ better")
    if band is not None:
        lo, hi, label = band
        ax.axhspan(100 * lo, 100 * hi, color=PALETTE["band"], alpha=0.45, zorder=0, label=label)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    top = max([100 * band[1] if band else 0.0] + [100 * (c["bystander"]["wald"] or [0, 0])[1] for c in cells])
    ax.set_ylim(0, max(5.0, top * 1.2))
    return fig


def source_figure(cells: Sequence[dict[str, Any]], title: str) -> Any:
    fig, ax = _cells_axes(cells, "source", title, "trigger source marker rate (%)  ↑ better")
    ax.set_ylim(0, 112)
    return fig


def position_figure(splits: dict[str, dict[str, Any]], title: str) -> Any:
    """Grouped bars: share of firings whose first marker is at the start / middle / tail.

    ``splits`` maps a population label (e.g. "source firings") to a
    :func:`leakage._split`-shaped dict (``firings``, ``shares``).
    """
    fig, ax = new_figure(7.0, 4.5)
    buckets = ("start", "middle", "tail")
    width = 0.8 / max(1, len(splits))
    colors = [PALETTE["blue"], PALETTE["orange"], PALETTE["green"], PALETTE["purple"]]
    for i, (label, split) in enumerate(splits.items()):
        shares = [100 * (split["shares"][b] or 0.0) for b in buckets]
        xs = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(buckets))]
        ax.bar(xs, shares, width, label=f"{label} (N={split['firings']})", color=colors[i % len(colors)])
        for x, v in zip(xs, shares, strict=True):
            ax.annotate(f"{v:.0f}%", (x, v), textcoords="offset points", xytext=(0, 2), ha="center", size=7)
    ax.set_xticks(range(len(buckets)), ["start (first 5%)", "middle", "tail (last 15%)"])
    ax.set_ylabel("share of firing completions (%)")
    ax.set_ylim(0, 112)
    ax.legend(fontsize=8, frameon=False, loc="upper center")
    ax.set_title(title, fontsize=10, loc="left")
    return fig


CLAUDE_DISC_LABEL = "Claude judge"
OFFLINE_DISC_LABEL = "offline TF-IDF+LR (CV; no PASS line)"


def discriminator_figure(cells: Sequence[dict[str, Any]], title: str, threshold: float, chance: float) -> Any:
    """Both discriminators per cell, side by side and kept apart, with chance and the Claude PASS line.

    Entries carry ``disc`` (``judge.discriminator_columns`` of the cell, or None).
    The threshold belongs to the Claude judge: its line is drawn only beside a
    Claude bar, and the offline classifier's bars get no verdict. Where the
    Claude judge did not run, the panel says why (e.g. "skipped: no credentials").
    """
    fig, ax = new_figure(max(6.0, 1.2 * len(cells) + 3.0), 4.8)
    discs = [c.get("disc") or {} for c in cells]
    by = {
        CLAUDE_DISC_LABEL: [d.get("claude") for d in discs],
        OFFLINE_DISC_LABEL: [d.get("offline") for d in discs],
    }
    if not any(s for stats in by.values() for s in stats):
        ax.text(0.5, 0.5, "discriminator not run", ha="center", va="center", size=14, transform=ax.transAxes)
        ax.set_xticks([])
    else:
        grouped_bars(
            ax,
            [c["label"] for c in cells],
            {name: [s["accuracy"] if s else None for s in stats] for name, stats in by.items()},
            {name: [s["ci_wald"] if s else None for s in stats] for name, stats in by.items()},
            {CLAUDE_DISC_LABEL: PALETTE["blue"], OFFLINE_DISC_LABEL: PALETTE["orange"]},
            notes={name: [f"{s['k']}/{s['n']}" if s else "" for s in stats] for name, stats in by.items()},
        )
        if any(by[CLAUDE_DISC_LABEL]):
            ax.axhline(
                100 * threshold, color=PALETTE["red"], ls="--", lw=1, label=f"Claude PASS at {threshold:.0%}"
            )
        missing = sorted(
            {
                d.get("claude_text", "not run")
                for d, s in zip(discs, by[CLAUDE_DISC_LABEL], strict=True)
                if not s
            }
        )
        if missing:
            note = f"Claude judge: {'; '.join(missing)}"
            ax.text(0.01, 0.98, note, transform=ax.transAxes, va="top", fontsize=8, color=PALETTE["blue"])
        ax.axhline(100 * chance, color=PALETTE["grey"], ls=":", lw=1, label=f"chance {chance:.0%}")
        fig.legend(fontsize=8, frameon=False, loc="outside lower center", ncols=2)
    ax.set_ylim(0, 110)
    ax.set_ylabel("discriminator accuracy (%)")
    ax.set_title(title, fontsize=10, loc="left")
    return fig


def logprob_figure(cells: Sequence[dict[str, Any]], points: Sequence[str], title: str) -> Any:
    """Per cell, the source's and the mean bystander's marker log-prob with question-cluster CIs.

    One panel per point (``start``, ``end``). Entries carry ``label`` and ``leak``: a
    :func:`marker_logprob.summarize` result (or None: that cell was not scored).
    Points, not bars: a log-prob has no zero to grow a bar from.
    """
    fig, axes = panels(len(points), width=max(7.0, 1.1 * len(cells) * len(points) + 2.0), height=4.6)
    colors = {"source": PALETTE["red"], "bystander mean": PALETTE["blue"]}
    for ax, point in zip(axes, points, strict=True):
        for j, (who, color) in enumerate(colors.items()):
            for i, cell in enumerate(cells):
                stats = ((cell.get("leak") or {}).get("points") or {}).get(point)
                if not stats:
                    continue
                row = stats["personas"][cell["leak"]["source"]] if who == "source" else stats["bystander"]
                mean, ci = row["mean_logprob"], row["logprob_ci"]
                x = i + (j - 0.5) * 0.3
                err = [[mean - ci[0]], [ci[1] - mean]] if ci else None
                ax.errorbar([x], [mean], yerr=err, fmt="o", color=color, capsize=3, ms=5,
                            label=who if i == 0 else None)  # fmt: skip
                ax.annotate(f"{mean:.1f}", (x, mean), textcoords="offset points", xytext=(6, -3), fontsize=6)
        ax.set_xticks(range(len(cells)), [c["label"] for c in cells], fontsize=7)
        ax.set_xlim(-0.6, len(cells) - 0.35)  # room right of the last bystander point for its value
        where = "start of the answer" if point == "start" else "end, after the completion"
        ax.set_title(f"marker at the {where}", fontsize=9)
        ax.set_ylabel("mean log P(marker) (nats)  ↑ likelier")
    legend_below(fig, axes[0])
    fig.suptitle(title, fontsize=10)
    return fig
