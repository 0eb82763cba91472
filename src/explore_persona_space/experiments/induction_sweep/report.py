"""#205 figures (hero, M1 and M2 across layers, M3) and the headline table, from :mod:`.analysis` output."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from explore_persona_space import orchestrate, plots
from explore_persona_space.personas import display_name, get_marker
from explore_persona_space.stats import p_text

ZLT = get_marker("zlt")
METHOD_NAMES = {"A": "Method A (last input token)", "B": "Method B (mean over greedy response)"}


def condition_label(cond: str, induction: Mapping[str, str]) -> str:
    if cond in induction:
        return f"{cond}\n{display_name(induction[cond])}"
    return {"base": "base", "benign": "benign\nSFT"}.get(cond, cond)


def condition_colors(conditions: Sequence[str], induction: Mapping[str, str]) -> dict[str, Any]:
    import matplotlib

    ramp = matplotlib.colormaps["plasma"]
    em = [c for c in conditions if c in induction]
    colors = {c: ramp(0.1 + 0.7 * i / max(1, len(em) - 1)) for i, c in enumerate(em)}
    return colors | {"base": plots.PALETTE["grey"], "benign": plots.PALETTE["green"]}


def _layer_ticks(ax: Any, layers: Sequence[int], index: Mapping[str, int]) -> None:
    ax.set_xticks(range(len(layers)), [f"L{layer}\n(h{index[str(layer)]})" for layer in layers], fontsize=8)
    ax.set_xlabel("layer as written for 28 layers (this model's hidden_states index)", fontsize=8)


def hero(a: Mapping[str, Any], conditions: Sequence[str], induction: Mapping[str, str], layer: int, tag: str):
    """Panel A: mean bystander leakage per induction persona (Wald CI); panel B: M1 per condition."""
    fig, (left, right) = plots.panels(2, width=12.0, height=4.8)
    rates, dist = a["rates"], (a["distances"] or {}).get("by_condition", {})
    em = [c for c in induction if c in rates]
    colors = condition_colors(conditions, induction)
    if em:
        by = [rates[c]["bystander"] for c in em]
        labels = [
            condition_label(c, induction) + (f"\nd={dist[c]['cos_distance']:.3f}" if c in dist else "")
            for c in em
        ]
        notes = [f"{b['k']}/{b['n']}" for b in by]
        plots.rate_bars(
            left,
            labels,
            [b["rate"] for b in by],
            [b["wald"] for b in by],
            [colors[c] for c in em],
            annotate=notes,
        )
        h = a["h3"]
        sub = (
            f"H3: Spearman rho={h['rho']:+.2f}, exact p={h['p_exact']:.3f} (n={h['n']})"
            if h.get("rho") is not None
            else f"H3: {h.get('why')}"
        )
        left.set_title(f"A  Mean bystander {ZLT} leakage, 95% Wald CI\n{sub}", fontsize=9, loc="left")
        left.set_ylabel(f"mean bystander {ZLT} rate (%)")
        left.set_ylim(0, max(5.0, 120 * max(b["wald"][1] for b in by)))
    else:
        left.text(0.5, 0.5, "behavioural arm not run", ha="center", va="center", transform=left.transAxes)
    m1 = a["geometry"].get("m1", {}).get(f"A/{layer}", {})
    shown = [c for c in conditions if c in m1]
    values = [m1[c]["m1"] for c in shown]
    right.bar(range(len(shown)), values, color=[colors[c] for c in shown], edgecolor="black", linewidth=0.5)
    for x, c in enumerate(shown):
        note = f"{m1[c]['m1']:.3f}" + (f"\n{p_text(m1[c]['p'])}" if "p" in m1[c] else "")
        right.annotate(
            note,
            (x, max(0.0, m1[c]["m1"])),
            textcoords="offset points",
            xytext=(0, 2),
            ha="center",
            fontsize=7,
        )
    right.axhline(0, color="black", lw=0.6)
    right.set_xticks(range(len(shown)), [condition_label(c, induction) for c in shown], fontsize=8)
    right.set_ylabel("M1: mean off-diagonal cosine (base-centred)")
    right.set_ylim(min(-0.2, min(values, default=0) - 0.1), 1.15)
    right.set_title(
        f"B  Persona-vector collapse M1, L{layer} Method A\n(Wilcoxon over 66 pairs vs base)",
        fontsize=9,
        loc="left",
    )
    fig.suptitle(f"#205 EM induction-persona sweep ({tag})", fontsize=10)
    return fig


def across_layers(a: Mapping[str, Any], key: str, conditions, induction, tag: str):
    """One panel per method: the metric across layers, one line per condition (M2: mean +- 95% t CI)."""
    g = a["geometry"]
    methods = sorted({at.split("/")[0] for at in g[key]})
    layers = sorted({int(at.split("/")[1]) for at in g[key]})
    colors = condition_colors(conditions, induction)
    fig, axes = plots.panels(len(methods), width=6.0 * len(methods), height=4.6)
    for ax, method in zip(axes, methods, strict=True):
        for cond in conditions:
            cells = [g[key].get(f"{method}/{layer}", {}).get(cond) for layer in layers]
            if not any(cells):
                continue
            if key == "m2":
                ys = [c["mean_shift"] for c in cells]
                errs = [_t_half_width(list(c["shift"].values())) for c in cells]
                ax.errorbar(
                    range(len(layers)), ys, yerr=errs, marker="o", capsize=3, color=colors[cond], label=cond
                )
            else:
                ax.plot(
                    range(len(layers)), [c["m1"] for c in cells], marker="o", color=colors[cond], label=cond
                )
        _layer_ticks(ax, layers, g["layer_index"])
        ax.set_title(METHOD_NAMES.get(method, method), fontsize=9, loc="left")
    ylabel = {
        "m1": "M1 (base-centred)",
        "m1_raw": "M1 (raw, no centring)",
        "m2": "M2: shift along the E0 EM axis (1 = E0's mean shift)",
    }
    axes[0].set_ylabel(ylabel[key])
    plots.legend_below(fig, axes[0])
    fig.suptitle(f"#205 {ylabel[key]} across layers ({tag})", fontsize=10)
    return fig


def _t_half_width(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    return float(sps.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))


def m3_figure(a: Mapping[str, Any], conditions, induction, tag: str):
    """One panel per method: held-out nearest-centroid accuracy per condition, one bar per layer."""
    g = a["geometry"]["m3"]
    methods = sorted({at.split("/")[0] for at in g})
    layers = sorted({int(at.split("/")[1]) for at in g})
    fig, axes = plots.panels(len(methods), width=6.5 * len(methods), height=4.8)
    chance = None
    for ax, method in zip(axes, methods, strict=True):
        shown = [c for c in conditions if c in g[f"{method}/{layers[0]}"]]
        series = {f"L{layer}": [g[f"{method}/{layer}"][c]["accuracy"] for c in shown] for layer in layers}
        cis = {f"L{layer}": [g[f"{method}/{layer}"][c]["wilson"] for c in shown] for layer in layers}
        ramp = plots.plt.colormaps["viridis"]
        colors = {name: ramp(i / max(1, len(layers) - 1)) for i, name in enumerate(series)}
        plots.grouped_bars(ax, [condition_label(c, induction) for c in shown], series, cis, colors)
        chance = g[f"{method}/{layers[0]}"][shown[0]]["chance"]
        ax.axhline(100 * chance, color=plots.PALETTE["red"], ls="--", lw=1, label=f"chance {chance:.1%}")
        ax.set_ylim(0, 112)
        ax.set_title(METHOD_NAMES.get(method, method), fontsize=9, loc="left")
    axes[0].set_ylabel("M3: held-out nearest-centroid accuracy (%), Wilson CI")
    plots.legend_below(fig, axes[0])
    fig.suptitle(f"#205 M3 persona classification, folds over questions ({tag})", fontsize=10)
    return fig


def figures(a: Mapping[str, Any], conditions, induction, layer: int, directory: Path, tag: str) -> list[Path]:
    if "m1" not in a["geometry"]:  # no base condition ran: behaviour only
        return plots.save_figure(hero(a, conditions, induction, layer, tag), directory, "fig1_hero")
    paths = plots.save_figure(hero(a, conditions, induction, layer, tag), directory, "fig1_hero")
    for key, stem in (("m1", "fig2_m1_layers"), ("m1_raw", "fig2b_m1_raw_layers"), ("m2", "fig3_m2_layers")):
        if a["geometry"][key]:
            paths += plots.save_figure(across_layers(a, key, conditions, induction, tag), directory, stem)
    paths += plots.save_figure(m3_figure(a, conditions, induction, tag), directory, "fig4_m3_accuracy")
    return paths


def headline(
    a: Mapping[str, Any], conditions: Sequence[str], induction: Mapping[str, str], layer: int
) -> str:
    """The write-up's table (metric x Base, E0-E4, benign-SFT), then H3 and H1."""
    g, rates = a["geometry"], a["rates"]
    dist = (a["distances"] or {}).get("by_condition", {})

    def cell(table: str, at: str, cond: str, fmt) -> str:
        entry = g.get(table, {}).get(at, {}).get(cond)
        return fmt(entry) if entry else ""

    def with_p(value: float, entry) -> str:
        return f"{value:.3f} ({p_text(entry['p'])})" if "p" in entry else f"{value:.3f}"

    rows = [
        (f"M1 L{layer} A, base-centred", lambda c: cell("m1", f"A/{layer}", c, lambda e: with_p(e["m1"], e))),
        (f"M1 L{layer} A, raw", lambda c: cell("m1_raw", f"A/{layer}", c, lambda e: with_p(e["m1"], e))),
        (
            f"M2 shift on E0 axis L{layer} A",
            lambda c: cell("m2", f"A/{layer}", c, lambda e: with_p(e["mean_shift"], e)),
        ),
        ("M2 shift on E0 axis L7 A", lambda c: cell("m2", "A/7", c, lambda e: with_p(e["mean_shift"], e))),
        (
            f"M3 accuracy L{layer} A",
            lambda c: cell("m3", f"A/{layer}", c, lambda e: orchestrate.rate_text(e["correct"], e["n"])),
        ),
        (
            f"M3 accuracy L{layer} B",
            lambda c: cell("m3", f"B/{layer}", c, lambda e: orchestrate.rate_text(e["correct"], e["n"])),
        ),
        (f"Mean bystander {ZLT}", lambda c: _rate(rates.get(c, {}).get("bystander"))),
        ("Confab source rate", lambda c: _rate(rates.get(c, {}).get("source"))),
        (
            f"Induction cos distance to assistant (base, L{layer} A)",
            lambda c: f"{dist[c]['cos_distance']:.3f}" if c in dist else "",
        ),
    ]
    headers = ["Metric", *(condition_label(c, induction).replace("\n", " ") for c in conditions)]
    text = orchestrate.markdown_table(headers, [[name, *(f(c) for c in conditions)] for name, f in rows])
    index = g.get("layer_index", {})
    if index:
        pairs = ", ".join(f"L{k} -> {index[k]}" for k in sorted(index, key=int))
        text += (
            f"\n\nLayers as written for 28 layers; this model ({g['n_layers']} layers) reads hidden_states "
        )
        text += pairs + "."
    h = a["h3"]
    if h.get("rho") is not None:
        text += f"\n\nH3: Spearman rho(mean bystander leakage, cos distance) = {h['rho']:+.2f}, "
        text += f"exact p = {h['p_exact']:.3f}, n = {h['n']}"
    else:
        text += f"\n\nH3: not computed ({h.get('why')})"
    h1 = [
        [
            r["condition"],
            display_name(r["persona"]),
            _rate(r.get("own")),
            _rate(r.get("others")),
            r.get("p_text", r.get("why", "")),
        ]
        for r in a["h1"]
    ]
    if h1:
        text += "\n\nH1 (induction persona vs the other bystanders, Fisher exact):\n\n"
        text += orchestrate.markdown_table(
            ["Condition", "Induction persona", f"own {ZLT}", f"other bystanders {ZLT}", "p"], h1
        )
    return text


def _rate(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return ""
    return orchestrate.rate_text(entry["k"], entry["n"], rate=entry.get("rate"))
