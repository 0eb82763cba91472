"""Figures of the two-marker experiments, drawn from summary.json (PNG + PDF via :mod:`plots`).

1. ``p_b_given_a``: P(B|A) by pair x condition x role, question-cluster CIs (the hero figure);
2. ``bystander_b_t_minus_c``: each untrained bystander's B rate, T minus C, paired-bootstrap CIs;
3. ``position_signature``: of the completions where B fired, the share within 150 characters after
   A (chunk) and in the last 50 characters (suffix), per role within each cell;
4. ``per_persona_emissions``: A and B rates per persona in the T cells, trained personas starred;
(#354 draws its design-comparison figure itself, with :func:`grouped_bars`.)

An undefined rate (P(B|A) where A never fired) is an empty slot labelled n/a, never a zero bar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from explore_persona_space.data import TWO_MARKER_CONDITIONS
from explore_persona_space.experiments.two_marker.scoring import (
    CONDITION_LABELS,
    TRAINED_ROLES,
    Pair,
    cell_name,
)
from explore_persona_space.personas import display_name
from explore_persona_space.plots import PALETTE, grouped_bars, legend_below, panels, save_figure

ROLE_COLORS = {
    "donor": PALETTE["red"],
    "recipient": PALETTE["blue"],
    "negative": PALETTE["grey"],
    "bystander": PALETTE["orange"],
}
Stat = Mapping[str, Any]


def _stat(cell: Mapping[str, Any] | None, role: str, pair: Any) -> Stat | None:
    if cell is None:
        return None
    m = cell["metrics"]
    if role in ("donor", "recipient"):
        return m["personas"][getattr(pair, role)]["all"]
    return m["roles"][role]["all"]


def _points(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def pair_title(pair: Pair) -> str:
    return f"{pair.name}: {display_name(pair.donor)} -> {display_name(pair.recipient)}"


def p_b_given_a_figure(summary: Mapping[str, Any], pairs: Sequence[Pair], directory: Path) -> list[Path]:
    fig, axes = panels(len(pairs))
    groups = [f"{c}\n{CONDITION_LABELS[c]}" for c in TWO_MARKER_CONDITIONS]
    for ax, pair in zip(axes, pairs, strict=True):
        series, cis, notes = {}, {}, {}
        for role in ("donor", "recipient", "negative", "bystander"):
            stats = [
                _stat(summary["cells"].get(cell_name(pair, c)), role, pair) for c in TWO_MARKER_CONDITIONS
            ]
            label = role if role in ("donor", "recipient") else f"{role}s (pooled)"
            series[label] = [s["p_b_given_a"] if s else None for s in stats]
            cis[label] = [s["ci"]["p_b_given_a"] if s else None for s in stats]
            notes[label] = [f"{s['joint']}/{s['a']}" if s else "" for s in stats]
        colors = dict(zip(series, ROLE_COLORS.values(), strict=True))
        grouped_bars(ax, groups, series, cis, colors, notes=notes)
        ax.set_title(pair_title(pair), fontsize=10)
        ax.set_ylim(0, 115)
        ax.set_ylabel("P(B | A) (%)")
    legend_below(fig, axes[0])
    fig.suptitle(f"{summary['experiment']}: P(marker B | marker A) by condition and role (labels: joint/A)")
    return save_figure(fig, directory, "p_b_given_a")


def bystander_delta_figure(summary: Mapping[str, Any], pairs: Sequence[Pair], directory: Path) -> list[Path]:
    fig, axes = panels(len(pairs))
    for ax, pair in zip(axes, pairs, strict=True):
        deltas = summary["pairs"][pair.name]["bystander_b_delta_t_minus_c"]
        names = list(deltas)
        values = {"B rate T - C": [deltas[p]["estimate"] for p in names]}
        cis = {"B rate T - C": [deltas[p]["ci"] for p in names]}
        notes = {"B rate T - C": [_points(deltas[p]["estimate"]) for p in names]}
        if names:
            labels = [display_name(p) for p in names]
            grouped_bars(ax, labels, values, cis, {"B rate T - C": PALETTE["orange"]}, notes=notes)
        else:
            ax.text(0.5, 0.5, "T or C cell not run", ha="center", transform=ax.transAxes)
        ax.axhline(0, color="black", linewidth=0.8)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, -5), max(hi, 5))  # an all-zero panel still reads in points
        ax.set_title(pair_title(pair), fontsize=10)
        ax.set_ylabel("B rate, T minus C (points)")
    fig.suptitle(
        f"{summary['experiment']}: untrained bystanders' marker-B rate, chunk-on-donor minus control"
    )
    return save_figure(fig, directory, "bystander_b_t_minus_c")


ROLE_ORDER = ("donor", "recipient", "negative", "bystander")


def position_figure(summary: Mapping[str, Any], pairs: Sequence[Pair], directory: Path) -> list[Path]:
    """Chunk and suffix shares of B per role within each cell (negatives and bystanders pooled per role)."""
    fig, axes = panels(len(pairs), width=15.0, height=4.8)
    groups = [(c, role) for c in TWO_MARKER_CONDITIONS for role in ROLE_ORDER]
    labels = [f"{c}\n{role if role in ('donor', 'recipient') else role + 's'}" for c, role in groups]
    for ax, pair in zip(axes, pairs, strict=True):
        stats = [_stat(summary["cells"].get(cell_name(pair, c)), role, pair) for c, role in groups]
        series = {
            "chunk: B <= 150 chars after A": [s["chunk_share"] if s else None for s in stats],
            "suffix: B in last 50 chars": [s["suffix_share"] if s else None for s in stats],
        }
        notes = {k: [f"nB={s['b']}" if s else "" for s in stats] for k in series}
        colors = dict(zip(series, (PALETTE["purple"], PALETTE["green"]), strict=True))
        grouped_bars(ax, labels, series, {k: [None] * len(groups) for k in series}, colors, notes=notes)
        for x in (3.5, 7.5):  # between conditions
            ax.axvline(x, color="black", linewidth=0.6, alpha=0.5)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_ylim(0, 115)
        ax.set_title(pair_title(pair), fontsize=10)
        ax.set_ylabel("share of B emissions (%)")
    legend_below(fig, axes[0])
    fig.suptitle(f"{summary['experiment']}: where marker B sits, per role and cell (n/a = B never fired)")
    return save_figure(fig, directory, "position_signature")


def emissions_figure(
    summary: Mapping[str, Any], pairs: Sequence[Pair], directory: Path, condition: str = "T"
) -> list[Path]:
    fig, axes = plt.subplots(len(pairs), 1, figsize=(10, 7), layout="constrained", squeeze=False)
    for ax, pair in zip(axes[:, 0], pairs, strict=True):
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        cell = summary["cells"].get(cell_name(pair, condition))
        if cell is None:
            ax.text(0.5, 0.5, f"{condition} cell not run", ha="center", transform=ax.transAxes)
            continue
        personas = cell["metrics"]["personas"]
        names = list(personas)
        labels = [display_name(p) + (" *" if personas[p]["role"] in TRAINED_ROLES else "") for p in names]
        stats = [personas[p]["all"] for p in names]
        keys = {"A rate": "a", "B rate": "b"}
        series = {label: [st[f"{k}_rate"] for st in stats] for label, k in keys.items()}
        cis = {label: [st["ci"][f"{k}_rate"] for st in stats] for label, k in keys.items()}
        notes = {label: [f"{st[k]}/{st['n']}" for st in stats] for label, k in keys.items()}
        colors = {"A rate": PALETTE["blue"], "B rate": PALETTE["red"]}
        grouped_bars(ax, labels, series, cis, colors, notes=notes)
        ax.tick_params(axis="x", labelrotation=25)
        ax.set_ylim(0, 115)
        ax.set_ylabel("rate (%)")
        ax.set_title(f"{pair_title(pair)}, condition {condition} (* = trained persona)", fontsize=10)
    legend_below(fig, axes[0, 0])
    fig.suptitle(f"{summary['experiment']}: per-persona marker emissions")
    return save_figure(fig, directory, "per_persona_emissions")


Figure = Callable[[Mapping[str, Any], Sequence[Pair], Path], list[Path]]


def all_figures(summary: Mapping[str, Any], pairs: Sequence[Pair], directory: Path) -> list[Path]:
    paths: list[Path] = []
    draws: tuple[Figure, ...] = (
        p_b_given_a_figure,
        bystander_delta_figure,
        position_figure,
        emissions_figure,
    )
    for draw in draws:
        paths += draw(summary, pairs, directory)
    return paths
