"""summary.json and the headline tables of the two-marker study (#261, #354).

Built from the final-stage results of whichever cells are finished, so a run
over a subset of cells (``--cells``) still reports what it can; a gate whose
cell is missing reads UNDEFINED rather than disappearing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from explore_persona_space.experiments.two_marker.scoring import (
    CONDITION_LABELS,
    FLOOR_CELL,
    Design,
    bystander_b_deltas,
    bystander_recipient_ratio,
    cell_name,
    falsification_gate,
    id_ood_trigger,
    sanity_gates,
)
from explore_persona_space.orchestrate import Resolved, markdown_table, pct, rate_text
from explore_persona_space.personas import display_name

Results = Mapping[str, Mapping[str, Any]]


def _cell_view(result: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's metrics without the per-question arrays (those stay in run_result.json)."""
    metrics = {k: v for k, v in result["metrics"].items() if k != "per_question"}
    return {"metrics": metrics, "probe": result.get("probe"), "n": result["n"]}


def summarize(results: Results, *, design: Design, run: Resolved) -> dict[str, Any]:
    """Per-cell metrics, per-pair gates, bystander T-minus-C deltas, probe and base floor."""
    scale = run.scale
    boot = {"n_boot": scale.n_boot, "seed": scale.seed}
    metrics = {name: r["metrics"] for name, r in results.items()}
    pairs: dict[str, Any] = {}
    for pair in design.pairs:
        t, c = metrics.get(cell_name(pair, "T")), metrics.get(cell_name(pair, "C"))
        gates = sanity_gates(pair, t, c, scale.gates)
        falsification, diff = falsification_gate(pair, t, c, band=scale.gates.falsification_band, **boot)
        deltas = bystander_b_deltas(design.roles(pair), t, c, **boot) if t and c else {}
        pairs[pair.name] = {
            "donor": pair.donor,
            "recipient": pair.recipient,
            "sanity_gates": [g.to_dict() for g in gates],
            "sanity_passed": sum(g.passed is True for g in gates),
            "sanity_failed": sum(g.passed is False for g in gates),
            "sanity_undefined": sum(g.passed is None for g in gates),
            "falsification": {**falsification.to_dict(), "difference": diff},
            "bystander_b_delta_t_minus_c": deltas,
            "id_ood": id_ood_trigger(pair, metrics, threshold=scale.gates.heterogeneity_points),
            "bystander_recipient_ratio": bystander_recipient_ratio(pair, t, design.roles(pair)),
        }
    return {
        "experiment": design.experiment,
        "title": design.title,
        "design": {"placement": design.placement, "eos_in_loss": scale.train.loss.eos_in_loss},
        "pairs_design": [dataclasses.asdict(p) for p in design.pairs],
        **run.to_dict(),
        "match_mode": f"{design.match_mode} (strict in each persona's 'strict' block)",
        "cells": {name: _cell_view(r) for name, r in results.items()},
        "pairs": pairs,
        "missing_cells": [n for n in design.cell_names() if n not in results],
    }


def ci_text(ci: list[float] | None) -> str:
    """`` [lo, hi]`` in percent, or nothing when the interval is undefined."""
    return "" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _row(pair: str, cond: str, role: str, who: str, p: Mapping[str, Any]) -> list[str]:
    s = p["all"]
    pba = "undefined" if s["p_b_given_a"] is None else rate_text(s["joint"], s["a"])
    return [
        pair,
        cond,
        role,
        who,
        str(s["n"]),
        rate_text(s["a"], s["n"]) + ci_text(s["ci"]["a_rate"]),
        rate_text(s["b"], s["n"]) + ci_text(s["ci"]["b_rate"]),
        pba + ci_text(s["ci"]["p_b_given_a"]),
        f"{pct(p['id']['p_b_given_a'])} / {pct(p['ood']['p_b_given_a'])}",
        f"{pct(s['chunk_share'])} / {pct(s['suffix_share'])}",
        pct(p["strict"]["p_b_given_a"]) if "strict" in p else "",
    ]


RATE_HEADERS = [
    "pair",
    "condition",
    "role",
    "persona",
    "n",
    "A rate [CI]",
    "B rate [CI]",
    "P(B|A) (joint/A) [CI]",
    "P(B|A) ID / OOD",
    "B chunk / suffix",
    "P(B|A) strict",
]


def rates_table(summary: Mapping[str, Any], design: Design) -> str:
    rows = []
    for name, pair, cond in design.adapter_cells():
        cell = summary["cells"].get(name)
        if cell is None:
            continue
        m = cell["metrics"]
        for persona, role in design.roles(pair).items():  # every persona its own row (pooled: summary.json)
            rows.append(_row(pair.name, cond, role, display_name(persona), m["personas"][persona]))
    return markdown_table(RATE_HEADERS, rows)


def gates_table(summary: Mapping[str, Any]) -> str:
    rows = []
    for name, p in summary["pairs"].items():
        for g in [*p["sanity_gates"], p["falsification"]]:
            value = "n/a" if g["value"] is None else f"{100 * g['value']:.1f}%"
            threshold = f"{g['op']} {100 * g['threshold']:.0f}%"
            rows.append([name, g["name"], value, threshold, g["status"], g["detail"]])
    table = markdown_table(["pair", "gate", "value", "threshold", "status", "detail"], rows)
    return table + "\n\n" + "\n".join(gate_counts(summary))


def gate_counts(summary: Mapping[str, Any]) -> list[str]:
    """One line per pair: how many of the six sanity gates the code finds failed (write-up 002 miscounts)."""
    return [
        f"{name}: {p['sanity_failed']} of {len(p['sanity_gates'])} sanity gates failed "
        f"({p['sanity_passed']} passed, {p['sanity_undefined']} undefined)"
        for name, p in summary["pairs"].items()
    ]


def checks_text(summary: Mapping[str, Any]) -> str:
    """The ID/OOD heterogeneity trigger and the bystander-vs-recipient P(B|A) ratio, per pair."""
    lines = []
    for name, p in summary["pairs"].items():
        h = p["id_ood"]
        parts = [
            f"{r['condition']} {r['role']} {pct(r.get('id'))} / {pct(r.get('ood'))}"
            + ("" if r.get("difference") is None else f" ({100 * r['difference']:+.1f} pts)")
            for r in h["rows"]
        ]
        lines.append(
            f"- {name} ID/OOD trigger (|P(B|A) ID - OOD| >= {100 * h['threshold']:.0f} pts on a load-bearing "
            f"row): {h['verdict']}; " + "; ".join(parts)
        )
        r = p["bystander_recipient_ratio"]
        if r.get("ratio") is not None:
            lines.append(
                f"- {name} bystander vs recipient P(B|A) (T): {display_name(r['bystander'])} "
                f"{rate_text(r['bystander_joint'], r['bystander_a'])} / {display_name(r['recipient'])} "
                f"{rate_text(r['recipient_joint'], r['recipient_a'])} = {r['ratio']:.1f}x"
            )
        else:
            lines.append(f"- {name} bystander vs recipient P(B|A) (T): undefined ({r.get('why')})")
    return "\n".join(lines)


def probe_and_floor_table(summary: Mapping[str, Any], design: Design) -> str:
    rows = []
    for pair in design.pairs:
        cell = summary["cells"].get(cell_name(pair, "T"))
        probe = cell and cell["probe"]
        if probe:
            rows.append(
                [
                    f"weird-marker probe, {pair.name} T",
                    display_name(probe["persona"]),
                    probe["n"],
                    f"{pct(probe['b_rate'])} ({probe['b']})",
                    f"{pct(probe['echo_rate'])} ({probe['echo']})",
                    f"{pct(probe['a_rate'])} ({probe['a']})",
                ]
            )
    floor = summary["cells"].get(FLOOR_CELL)
    if floor:
        s = floor["metrics"]["roles"]["base"]["all"]
        rows.append(
            [
                "base-model floor",
                "all 11",
                s["n"],
                f"{pct(s['b_rate'])} ({s['b']})",
                "-",
                f"{pct(s['a_rate'])} ({s['a']})",
            ]
        )
    return markdown_table(["check", "persona", "n", "B rate", "probe echo", "A rate"], rows)


def headline(summary: Mapping[str, Any], design: Design, extra: str = "") -> str:
    parts = [
        f"Scale `{summary['scale']}`, model `{summary['model']}`, {summary['match_mode']} matching; "
        "CIs: question-cluster bootstrap 95%. Conditions: "
        + ", ".join(f"{k} = {v}" for k, v in CONDITION_LABELS.items())
        + ". Gates: PASS for falsification means chunk-binding is falsified.",
        "Pairs: "
        + "; ".join(f"{p.name} = {p.donor} -> {p.recipient}" for p in design.pairs)
        + ". One row per persona (role-pooled numbers are in summary.json).",
        rates_table(summary, design),
        gates_table(summary),
        checks_text(summary),
        probe_and_floor_table(summary, design),
    ]
    if extra:
        parts.append(extra)
    if summary["missing_cells"]:
        parts.append("Cells not finished yet: " + ", ".join(summary["missing_cells"]))
    return "\n\n".join(parts)
