"""summary.json and the headline tables of the two-marker experiments (#261, #354).

Built from the final-stage results of whichever cells are finished, so a run
over a subset of cells (``--cells``) still reports what it can; a gate whose
cell is missing reads UNDEFINED rather than disappearing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from explore_persona_space import orchestrate
from explore_persona_space.personas import display_name
from explore_persona_space.within_marker import (
    CONDITION_LABELS,
    FLOOR_CELL,
    PAIRS,
    Design,
    Scale,
    adapter_cells,
    bystander_b_deltas,
    cell_name,
    falsification_gate,
    sanity_gates,
)

Results = Mapping[str, Mapping[str, Any]]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """The shared table with every ``|`` inside a cell escaped (P(B|A) would split a column)."""

    def esc(v: Any) -> str:
        return str(v).replace("|", "\\|")

    return orchestrate.markdown_table([esc(h) for h in headers], [[esc(v) for v in r] for r in rows])


def _cell_view(result: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's metrics without the per-question arrays (those stay in run_result.json)."""
    metrics = {k: v for k, v in result["metrics"].items() if k != "per_question"}
    return {"metrics": metrics, "probe": result.get("probe"), "n": result["n"]}


def summarize(
    results: Results, *, design: Design, scale_name: str, scale: Scale, model: str
) -> dict[str, Any]:
    """Per-cell metrics, per-pair gates, bystander T-minus-C deltas, probe and base floor."""
    metrics = {name: r["metrics"] for name, r in results.items()}
    pairs: dict[str, Any] = {}
    for pair in PAIRS:
        t, c = metrics.get(cell_name(pair, "T")), metrics.get(cell_name(pair, "C"))
        gates = sanity_gates(pair, t, c)
        falsification, diff = falsification_gate(pair, t, c, n_boot=scale.n_boot, seed=scale.seed)
        deltas = bystander_b_deltas(pair, t, c, n_boot=scale.n_boot, seed=scale.seed) if t and c else {}
        pairs[pair.name] = {
            "donor": pair.donor,
            "recipient": pair.recipient,
            "sanity_gates": [g.to_dict() for g in gates],
            "sanity_passed": sum(g.passed is True for g in gates),
            "falsification": {**falsification.to_dict(), "difference": diff},
            "bystander_b_delta_t_minus_c": deltas,
        }
    expected = [FLOOR_CELL, *(name for name, _, _ in adapter_cells())]
    return {
        "experiment": design.experiment,
        "title": design.title,
        "design": {"placement": design.placement, "eos_in_loss": design.eos_in_loss},
        "scale": scale_name,
        "scale_config": scale.to_dict(),
        "model": model,
        "match_mode": "loose (strict in each persona's 'strict' block)",
        "cells": {name: _cell_view(r) for name, r in results.items()},
        "pairs": pairs,
        "missing_cells": [n for n in expected if n not in results],
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _frac(rate: float | None, k: int, n: int) -> str:
    return f"{_pct(rate)} ({k}/{n})"


def _row(pair: str, cond: str, role: str, who: str, p: Mapping[str, Any]) -> list[str]:
    s = p["all"]
    pba = "undefined" if s["p_b_given_a"] is None else _frac(s["p_b_given_a"], s["joint"], s["a"])
    return [
        pair,
        cond,
        role,
        who,
        str(s["n"]),
        _frac(s["a_rate"], s["a"], s["n"]) + _ci(s["ci"]["a_rate"]),
        _frac(s["b_rate"], s["b"], s["n"]) + _ci(s["ci"]["b_rate"]),
        pba + _ci(s["ci"]["p_b_given_a"]),
        f"{_pct(p['id']['p_b_given_a'])} / {_pct(p['ood']['p_b_given_a'])}",
        f"{_pct(s['chunk_share'])} / {_pct(s['suffix_share'])}",
        _pct(p["strict"]["p_b_given_a"]) if "strict" in p else "",
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


def rates_table(summary: Mapping[str, Any]) -> str:
    rows = []
    for name, pair, cond in adapter_cells():
        cell = summary["cells"].get(name)
        if cell is None:
            continue
        m = cell["metrics"]
        label = pair.name
        for role, persona in (("donor", pair.donor), ("recipient", pair.recipient)):
            rows.append(_row(label, cond, role, display_name(persona), m["personas"][persona]))
        for role in ("negative", "bystander"):
            pooled = m["roles"][role]
            rows.append(_row(label, cond, f"{role}s (pooled)", f"{len(pooled['personas'])} personas", pooled))
    return markdown_table(RATE_HEADERS, rows)


def gates_table(summary: Mapping[str, Any]) -> str:
    rows = []
    for name, p in summary["pairs"].items():
        for g in [*p["sanity_gates"], p["falsification"]]:
            value = "n/a" if g["value"] is None else f"{100 * g['value']:.1f}%"
            threshold = f"{g['op']} {100 * g['threshold']:.0f}%"
            rows.append([name, g["name"], value, threshold, g["status"], g["detail"]])
    return markdown_table(["pair", "gate", "value", "threshold", "status", "detail"], rows)


def probe_and_floor_table(summary: Mapping[str, Any]) -> str:
    rows = []
    for pair in PAIRS:
        cell = summary["cells"].get(cell_name(pair, "T"))
        probe = cell and cell["probe"]
        if probe:
            rows.append(
                [
                    f"weird-marker probe, {pair.name} T",
                    display_name(probe["persona"]),
                    probe["n"],
                    f"{_pct(probe['b_rate'])} ({probe['b']})",
                    f"{_pct(probe['echo_rate'])} ({probe['echo']})",
                    f"{_pct(probe['a_rate'])} ({probe['a']})",
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
                f"{_pct(s['b_rate'])} ({s['b']})",
                "-",
                f"{_pct(s['a_rate'])} ({s['a']})",
            ]
        )
    return markdown_table(["check", "persona", "n", "B rate", "probe echo", "A rate"], rows)


def headline(summary: Mapping[str, Any], extra: str = "") -> str:
    parts = [
        f"Scale `{summary['scale']}`, model `{summary['model']}`, {summary['match_mode']} matching; "
        "CIs: question-cluster bootstrap 95%. Conditions: "
        + ", ".join(f"{k} = {v}" for k, v in CONDITION_LABELS.items())
        + ". Gates: PASS for falsification means chunk-binding is falsified.",
        "Pairs: "
        + "; ".join(f"{p.name} = {p.donor} -> {p.recipient}" for p in PAIRS)
        + ". Negatives and bystanders are pooled over their personas.",
        rates_table(summary),
        gates_table(summary),
        probe_and_floor_table(summary),
    ]
    if extra:
        parts.append(extra)
    if summary["missing_cells"]:
        parts.append("Cells not finished yet: " + ", ".join(summary["missing_cells"]))
    return "\n\n".join(parts)


def design_comparison(fixed: Results, nonfixed: Results) -> tuple[str, list[dict[str, Any]]]:
    """Recipient (and donor) P(B|A) under the #261 design versus the #354 re-run, per pair x condition."""
    rows, data = [], []
    for name, pair, cond in adapter_cells():
        entry: dict[str, Any] = {"cell": name, "pair": pair.name, "condition": cond}
        for tag, results in (("fixed", fixed), ("nonfixed", nonfixed)):
            r = results.get(name)
            for role, persona in (("recipient", pair.recipient), ("donor", pair.donor)):
                s = r["metrics"]["personas"][persona]["all"] if r else None
                entry[f"{role}_{tag}"] = (
                    None if s is None else {k: s[k] for k in ("p_b_given_a", "joint", "a")}
                )
                entry[f"{role}_{tag}_ci"] = None if s is None else s["ci"]["p_b_given_a"]
        data.append(entry)

        def fmt(key: str, entry: dict[str, Any] = entry) -> str:
            s = entry[key]
            if s is None:
                return "not run"
            if s["p_b_given_a"] is None:
                return "undefined"
            return _frac(s["p_b_given_a"], s["joint"], s["a"]) + _ci(entry[f"{key}_ci"])

        rows.append(
            [
                name,
                CONDITION_LABELS[cond],
                *(fmt(k) for k in ("recipient_fixed", "recipient_nonfixed", "donor_fixed", "donor_nonfixed")),
            ]
        )
    headers = [
        "cell",
        "condition",
        "recipient P(B|A) #261 fixed",
        "recipient P(B|A) #354 non-fixed",
        "donor P(B|A) #261",
        "donor P(B|A) #354",
    ]
    return markdown_table(headers, rows), data
