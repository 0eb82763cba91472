"""Single-marker leakage numbers per cell, from :func:`analyze.analyze` summaries.

The write-ups report, per cell: the trigger (source) persona's marker rate with
k/n, the mean bystander rate (unweighted over the non-source personas) with the
pooled k/n it comes from, the start/middle/tail split of first-marker positions
for source firings and for bystander firings, and a per-bystander table. These
functions turn one summary (or several, pooled) into exactly those numbers, so
every single-marker orchestrator reports them the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from explore_persona_space.metrics import BUCKETS
from explore_persona_space.stats import wald_ci, wilson_ci


def _bystanders(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {p: c for p, c in summary["personas"].items() if p != summary["source"]}


def cell_rates(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Source and bystander rates of one cell, with counts and 95% Wald intervals.

    The bystander rate is the unweighted mean over bystander personas (the
    definition); ``k``/``n`` are pooled over them and the interval is the Wald
    interval of the pooled proportion, which equals the mean when every persona
    has the same number of completions (as in every protocol here).
    """
    source = summary["source"]
    if source is None:
        raise ValueError("cell_rates needs a summary scored with a source persona")
    src = summary["personas"][source]
    by = _bystanders(summary)
    k = sum(c["k"] for c in by.values())
    n = sum(c["n"] for c in by.values())
    return {
        "source": {"persona": source, "k": src["k"], "n": src["n"], "rate": src["rate"], "wald": src["wald"]},
        "bystander": {
            "personas": list(by),
            "k": k,
            "n": n,
            "rate": summary["bystander_mean"],
            "pooled_rate": k / n if n else None,
            "wald": list(wald_ci(k, n)) if n else None,
        },
    }


def _split(positions: Sequence[Mapping[str, int]]) -> dict[str, Any]:
    counts = {b: sum(p[b] for p in positions) for b in BUCKETS}
    total = sum(counts.values())
    shares = {b: (v / total if total else None) for b, v in counts.items()}
    return {"firings": total, "counts": counts, "shares": shares}


def position_split(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Where the first marker sits in source firings vs bystander firings, pooled over ``summaries``."""
    src = [s["personas"][s["source"]]["positions"] for s in summaries]
    by = [c["positions"] for s in summaries for c in _bystanders(s).values()]
    return {"source": _split(src), "bystander": _split(by)}


def bystander_table(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{persona: {cell: {"k", "n", "rate"}}}`` over the bystanders of every cell."""
    table: dict[str, dict[str, Any]] = {}
    for cell, summary in summaries.items():
        for persona, c in _bystanders(summary).items():
            table.setdefault(persona, {})[cell] = {"k": c["k"], "n": c["n"], "rate": c["rate"]}
    return table


def group_rate(summary: Mapping[str, Any], personas: Sequence[str]) -> dict[str, Any]:
    """A group of personas in one cell: the unweighted mean rate, pooled k/n, Wald and Wilson CIs.

    One persona is the group of one (its own rate). The intervals are those of the pooled
    proportion, which equals the mean when every persona has the same number of completions.
    """
    rows = [summary["personas"][p] for p in personas]
    k, n = sum(r["k"] for r in rows), sum(r["n"] for r in rows)
    rates = [r["rate"] for r in rows if r["rate"] is not None]
    return {
        "personas": list(personas),
        "k": k,
        "n": n,
        "rate": sum(rates) / len(rates) if rates else None,
        "wald": list(wald_ci(k, n)) if n else None,
        "wilson": list(wilson_ci(k, n)) if n else None,
    }
