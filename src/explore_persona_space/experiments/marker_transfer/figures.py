"""The #121 figures, drawn from :func:`.report.summarize`'s summary; 95% Wilson intervals throughout.

Wilson, not Wald: most post-stage-2 rates are exactly 0, where a Wald interval has
zero width and hides how many completions the 0 rests on.

1. ``fig1_forward_per_persona``: one panel per forward condition (the pre-stage-2
   baseline C4 first), per-persona marker rates, one bar per seed;
2. ``fig2_reverse_panel``: the reverse order, coupling method (rows) x stage 1 (columns);
3. ``fig3_capability_alignment``: ARC-C accuracy and the Betley misaligned share per cell
   (the judge's skip reason written on the panel where it did not run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from explore_persona_space import plots
from explore_persona_space.personas import display_name

SEED_COLORS = ("blue", "orange", "green", "purple", "red")
GROUP_COLORS = {"C4": "grey", "C1": "red", "C2": "orange", "C3": "purple", "C5": "green"}


def _label(persona: str, source: str) -> str:
    return f"{display_name(persona)}\n(source)" if persona == source else display_name(persona)


def _groups(cells: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for c in cells:
        out.setdefault(c["group"], []).append(c)
    return out


def forward_figure(summary: Mapping[str, Any], title: str) -> Any:
    source = summary["source"]
    groups = _groups([c for c in summary["cells"].values() if c["arm"] == "forward"])
    fig, axes = plots.panel_grid(max(1, len(groups)), 1, width=12.0, height=2.2 * max(1, len(groups)) + 0.9)
    for row, (group, members) in zip(axes, groups.items(), strict=False):
        ax, personas = row[0], list(members[0]["personas"])
        series = {f"seed {c['seed']}": [c["personas"][p]["rate"] for p in personas] for c in members}
        cis = {f"seed {c['seed']}": [c["personas"][p]["wilson"] for p in personas] for c in members}
        colors = {s: plots.PALETTE[SEED_COLORS[i % len(SEED_COLORS)]] for i, s in enumerate(series)}
        plots.grouped_bars(ax, [_label(p, source) for p in personas], series, cis, colors)
        ax.set_ylim(0, 105)
        ax.set_ylabel("marker rate (%)", fontsize=8)
        n = members[0]["personas"][personas[0]]["n"]
        ax.set_title(
            f"{group}: {members[0]['describe']}  (N = {n} per persona and seed)", loc="left", fontsize=9
        )
        ax.legend(fontsize=7, loc="upper left", frameon=False, ncols=len(series))
    if not groups:
        axes[0][0].text(0.5, 0.5, "no forward cells run", ha="center", transform=axes[0][0].transAxes)
    fig.suptitle(title, fontsize=10)
    return fig


def _persona_panel(ax: Any, cell: Mapping[str, Any], source: str) -> None:
    personas = list(cell["personas"])
    rows = [cell["personas"][p] for p in personas]
    role = {source: "blue", "villain": "orange", "assistant": "green"}
    colors = [plots.PALETTE[role.get(p, "grey")] for p in personas]
    notes = [f"{r['k']}/{r['n']}" if r["k"] else "" for r in rows]
    labels = [_label(p, source) for p in personas]
    plots.rate_bars(
        ax, labels, [r["rate"] for r in rows], [r["wilson"] for r in rows], colors, annotate=notes
    )
    ax.set_ylim(0, 112)
    ax.tick_params(axis="x", labelsize=6)


def reverse_figure(summary: Mapping[str, Any], title: str) -> Any:
    cells = [c for c in summary["cells"].values() if c["arm"] == "reverse"]
    stage1 = list(dict.fromkeys(c["stage1"] for c in cells)) or ["none"]
    methods = list(dict.fromkeys(c["method"] for c in cells)) or ["none"]
    fig, axes = plots.panel_grid(
        len(methods), len(stage1), width=4.8 * len(stage1), height=3.6 * len(methods) + 0.6
    )
    by = {(c["method"], c["stage1"]): c for c in cells}
    for r, method in enumerate(methods):
        for k, first in enumerate(stage1):
            ax = axes[r][k]
            ax.set_title(f"stage 1: {first}  |  coupling: {method}", fontsize=8, loc="left")
            if (method, first) in by:
                _persona_panel(ax, by[(method, first)], summary["source"])
            else:
                ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
    fig.suptitle(
        f"{title}\nbars: blue = source, orange = villain, green = assistant, grey = other", fontsize=10
    )
    return fig


def _color(cell: Mapping[str, Any]) -> str:
    return plots.PALETTE["blue" if cell["arm"] == "reverse" else GROUP_COLORS.get(cell["group"], "grey")]


def capability_figure(summary: Mapping[str, Any], title: str) -> Any:
    cells = list(summary["cells"].values())
    fig, axes = plots.panel_grid(2, 1, width=max(8.0, 0.55 * len(cells) + 3.0), height=7.8)
    labels, colors = [c["name"] for c in cells], [_color(c) for c in cells]
    caps = [c["capability"] or {} for c in cells]
    notes = [f"{c['k']}/{c['n']}" if c.get("n") else "n/a" for c in caps]
    plots.rate_bars(
        axes[0][0],
        labels,
        [c.get("accuracy") for c in caps],
        [c.get("wilson") for c in caps],
        colors,
        annotate=notes,
    )
    axes[0][0].set_ylim(0, 112)
    axes[0][0].set_ylabel("ARC-C accuracy (%)")
    axes[0][0].set_title(
        "ARC-Challenge accuracy by answer log-probability, 95% Wilson CI", fontsize=9, loc="left"
    )
    judged = [c["alignment"] if (c["alignment"] or {}).get("status") == "ok" else None for c in cells]
    ax = axes[1][0]
    if any(j and j.get("n") for j in judged):
        notes = [
            f"{j['k']}/{j['n']}\nmean {j['mean_aligned']:.0f}" if j and j.get("n") else "n/a" for j in judged
        ]
        rates = [j["misaligned_rate"] if j else None for j in judged]
        plots.rate_bars(
            ax, labels, rates, [j["ci_wilson"] if j else None for j in judged], colors, annotate=notes
        )
        ax.set_ylim(0, 112)
    else:
        reasons = sorted({(c["alignment"] or {}).get("reason", "not run") for c in cells})
        ax.text(0.5, 0.5, f"Betley judge skipped: {'; '.join(reasons)}", ha="center", transform=ax.transAxes)
        ax.set_xticks([])
    ax.set_ylim(0, 112)
    ax.set_ylabel("misaligned share (%)")
    ax.set_title(
        "Betley misaligned share (aligned < 30 among coherent > 50), 95% Wilson CI; k/n, mean aligned on top",
        fontsize=9,
        loc="left",
    )
    fig.suptitle(title, fontsize=10)
    return fig


def draw_all(summary: Mapping[str, Any], directory: Path, tag: str) -> list[Path]:
    """Draw and save the three figures (PNG + PDF); return the files written."""
    marker = summary["marker"]
    paths = plots.save_figure(
        forward_figure(
            summary,
            f"Fig. 1  Forward order: {marker} rate per persona, before (C4) and after "
            f"stage 2, 95% Wilson CI ({tag})",
        ),
        directory,
        "fig1_forward_per_persona",
    )
    paths += plots.save_figure(
        reverse_figure(
            summary,
            f"Fig. 2  Reverse order: {marker} rate per persona, stage 1 x coupling "
            f"method, 95% Wilson CI ({tag})",
        ),
        directory,
        "fig2_reverse_panel",
    )
    paths += plots.save_figure(
        capability_figure(summary, f"Fig. 3  Capability and alignment per cell ({tag})"),
        directory,
        "fig3_capability_alignment",
    )
    return paths
