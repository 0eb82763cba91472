"""#247's inferential layer: the numbers write-up 000 bases its claims on, computed from the cells.

* :func:`cohort` - the mean bystander rate over the BS cells (the write-up's 11.7%),
  its SD across cells, and the plan's three-band verdict and escalation rule;
* :func:`paired_vs_205` - each BS cell against #205's EM-first cell of the same
  induction persona: the difference in points and a two-proportion test;
* :func:`spearman_check` - whether #205's rank gradient (rho = -0.90 against the induction
  persona's cosine similarity to the assistant) reappears across the BS cells;
* :func:`within_persona_sd` - each bystander persona's SD across the BS cells.

#205's numbers are not in code: :func:`load_reference` reads
``data/reference/issue205_em_first.json``, where each number sits beside the
write-up sentence it was copied from. Every function is pure (rates in, JSON-able
dicts out), so each is tested on hand-made cases and on the write-up's own numbers.
SDs are population SDs (ddof = 0): the write-up's "SD across cells 2.7pp" is that
of its five cell rates (12.5, 14.9, 6.95, 10.9, 13.1%) with ddof = 0 (ddof = 1 gives 3.0).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from explore_persona_space.paths import data_dir
from explore_persona_space.stats import no_variance, p_text, spearman_exact, two_proportion_test

REFERENCE_FILE = "reference/issue205_em_first.json"

# The plan's bands and rule, as write-up 000 states them:
#   "The plan defined three numerical bands the result could fall into: a "no detectable leakage"
#   band (cohort mean < 5%), a "symmetric with EM" band (cohort mean > 25%, matching the EM-first
#   arm), or an intermediate band in between."
#   "The plan's escalation rule triggers a 3-seed re-run on the assistant + paramedic cells if
#   cohort mean falls in [15%, 30%]"
NO_LEAKAGE_BELOW = 0.05
SYMMETRIC_ABOVE = 0.25
ESCALATE_BAND = (0.15, 0.30)
ESCALATE_CELLS = ("assistant", "paramedic")
BANDS = {
    "no_leakage": "no detectable leakage (cohort mean < 5%)",
    "symmetric": "symmetric with EM (cohort mean > 25%)",
    "intermediate": "intermediate (5% <= cohort mean <= 25%)",
}


def load_reference() -> dict[str, Any]:
    """#205's per-induction-persona numbers with the sentences they come from."""
    path = data_dir() / REFERENCE_FILE
    ref = json.loads(path.read_text(encoding="utf-8"))
    ref["file"] = f"data/{REFERENCE_FILE}"
    return ref


def band(mean: float) -> str:
    if mean < NO_LEAKAGE_BELOW:
        return "no_leakage"
    return "symmetric" if mean > SYMMETRIC_ABOVE else "intermediate"


def cohort(rates: Mapping[str, float]) -> dict[str, Any]:
    """Mean bystander rate over the BS cells (``{induction persona: rate}``), verdict and escalation."""
    if not rates:
        return {"n_cells": 0, "mean": None, "verdict": "undefined (no BS cell finished)"}
    values = list(rates.values())
    mean = statistics.fmean(values)
    key = band(mean)
    lo, hi = ESCALATE_BAND
    escalate = lo <= mean <= hi
    return {
        "n_cells": len(values),
        "rates": dict(rates),
        "mean": mean,
        "sd_across_cells": statistics.pstdev(values),
        "range": [min(values), max(values)],
        "band": key,
        "verdict": BANDS[key],
        "escalation": {
            "advised": escalate,
            "rule": f"cohort mean in [{100 * lo:.0f}%, {100 * hi:.0f}%] -> 3-seed re-run of the "
            + " + ".join(ESCALATE_CELLS)
            + " cells",
            "text": "3-seed re-run advised" if escalate else "no re-run (outside the escalation band)",
        },
    }


def paired_vs_205(cells: Mapping[str, Mapping[str, int]], ref: Mapping[str, Any]) -> dict[str, Any]:
    """Per BS cell (``{induction persona: {"k", "n"}}``, the pooled bystander counts): #205 minus #247.

    #205's k is reconstructed from its rounded rate (see the reference file's ``k_note``).
    The test is :func:`stats.two_proportion_test` (Fisher exact, two-sided, and the pooled z).
    """
    rates, n205 = ref["bystander_rate"]["values"], ref["n_per_cell"]["value"]
    rows = []
    for persona, c in cells.items():
        if persona not in rates:
            continue
        k205 = round(rates[persona] * n205)
        row = {"induction": persona, "k": c["k"], "n": c["n"], "rate": c["k"] / c["n"]}
        row |= {"rate_205": rates[persona], "k_205": k205, "n_205": n205}
        row["difference"] = rates[persona] - row["rate"]  # the write-up's "paired differences", 205 - 247
        if no_variance(c["k"], c["n"], k205, n205):
            row |= {"p_fisher": None, "p_z": None, "p_text": "undefined (no variance)"}
        else:
            test = two_proportion_test(k205, n205, c["k"], c["n"])
            row |= {"p_fisher": test.p_fisher, "p_z": test.p_z, "p_text": p_text(test.p_fisher)}
        rows.append(row)
    diffs = [r["difference"] for r in rows]
    return {
        "rows": rows,
        "mean_difference": statistics.fmean(diffs) if diffs else None,
        "range": [min(diffs), max(diffs)] if diffs else None,
        "reference": ref["bystander_rate"]["source"],
    }


def _rho(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    try:
        res = spearman_exact(x, y)
    except ValueError as exc:  # fewer than 3 cells, or constant rates
        return {"rho": None, "p_exact": None, "why": str(exc)}
    return {"rho": res.rho, "p_exact": res.p_exact, "n": res.n}


def spearman_check(rates: Mapping[str, float], ref: Mapping[str, Any]) -> dict[str, Any]:
    """Does #205's gradient reappear? Spearman of the BS rates against the cosine similarity.

    #205's own rho is recomputed from the reference file (it must come out at the
    quoted -0.90). "Reappears" is defined as a rho of #205's sign at least as
    strong as #205's (rho <= -0.90 here); the exact p-value is reported beside it
    (at n = 5 it cannot go below 1/60). The rank correlation with #205's own
    per-persona rates (does the ordering of cells repeat?) is reported too.
    """
    sim = ref["cosine_similarity_to_assistant"]["values"]
    em = ref["bystander_rate"]["values"]
    personas = [p for p in rates if p in sim]
    x, y = [sim[p] for p in personas], [rates[p] for p in personas]
    mine = _rho(x, y)
    theirs = _rho(list(sim.values()), [em[p] for p in sim])
    reappears = None
    if mine["rho"] is not None and theirs["rho"] is not None:
        reappears = mine["rho"] * theirs["rho"] > 0 and abs(mine["rho"]) >= abs(theirs["rho"]) - 1e-9
    return {
        "personas": personas,
        "x_similarity": x,
        "y_rate": y,
        **mine,
        "reference_rho_recomputed": theirs["rho"],
        "reference_p_exact_recomputed": theirs.get("p_exact"),
        "reference_quoted": {k: ref["spearman"][k] for k in ("rho", "p_exact", "quote", "note")},
        "reappears": reappears,
        "rule": "reappears = same sign as #205's rho and |rho| >= |rho_205|",
        "vs_205_rates": _rho([em[p] for p in personas], y),
    }


def within_persona_sd(table: Mapping[str, Mapping[str, Mapping[str, Any]]], cells: Sequence[str]) -> dict:
    """Per bystander persona: its rate in each of ``cells`` and the SD across them (ddof = 0)."""
    out: dict[str, Any] = {}
    for persona, by_cell in table.items():
        rates = {c: by_cell[c]["rate"] for c in cells if c in by_cell and by_cell[c]["rate"] is not None}
        if len(rates) >= 2:
            out[persona] = {"rates": rates, "sd": statistics.pstdev(rates.values())}
    sds = [v["sd"] for v in out.values()]
    return {"personas": out, "range": [min(sds), max(sds)] if sds else None, "ddof": 0}
