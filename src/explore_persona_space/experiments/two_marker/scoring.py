"""Two-marker scoring: roles, per-persona A/B/P(B|A) metrics with cluster CIs, and the gates.

Pure functions over completion records (no model, no pipeline), so the gates and
tables can be tested on hand-made records. The numbers - which pairs, which
negatives, the gate thresholds, every size - come from the scripts
(``scripts/run_issue261_within_marker.py`` and its #354 re-run) through
:class:`Design` and :class:`Gates`.

Vocabulary (the write-up's): the *donor* is taught ``A answer B``, the
*recipient* ``A answer`` (or nothing, as a negative), four *negative* personas
are trained unmarked, and the remaining eval personas are untrained
*bystanders*. P(B|A) = joint / A firings; it is undefined (None), not zero,
when A never fired. CIs resample questions (clusters), never single completions,
because completions of one question are not independent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from explore_persona_space.data import TWO_MARKER_CONDITIONS, TwoMarkerDesign
from explore_persona_space.metrics import Mode, TwoMarkerCounts, contains_marker, two_marker_flags
from explore_persona_space.personas import EVAL_PERSONAS, get_marker
from explore_persona_space.stats import cluster_bootstrap_ratio, wilson_ci

ROLES: tuple[str, ...] = ("donor", "recipient", "negative", "bystander")
TRAINED_ROLES: tuple[str, ...] = ("donor", "recipient", "negative")  # in T_P2neg the recipient is a negative
CONDITION_LABELS = {"T": "chunk-on-donor", "C": "control", "T_P2neg": "recipient-as-negative"}
FIELDS: tuple[str, ...] = ("n", "a", "b", "joint", "chunk", "suffix")
FLOOR_CELL = "base_floor"


@dataclass(frozen=True)
class Pair:
    name: str
    donor: str
    recipient: str


@dataclass(frozen=True)
class Design:
    """What a two-marker script decides besides its numbers: pairs, negatives, placement, match mode."""

    experiment: str
    title: str
    pairs: tuple[Pair, ...]
    negatives: tuple[str, ...]
    placement: TwoMarkerDesign  # "fixed" (A answer B) | "nonfixed" (seeded positions)
    match_mode: Mode  # the headline's; strict is reported beside it as a cross-check

    def roles(self, pair: Pair) -> dict[str, str]:
        """Role of every eval persona, in the write-up's order: donor, recipient, negatives, bystanders."""
        roles = {pair.donor: "donor", pair.recipient: "recipient"} | dict.fromkeys(self.negatives, "negative")
        return roles | {p: "bystander" for p in EVAL_PERSONAS if p not in roles}

    def trained_personas(self) -> tuple[str, ...]:
        trained = (p for pair in self.pairs for p in (pair.donor, pair.recipient, *self.negatives))
        return tuple(dict.fromkeys(trained))

    def adapter_cells(self) -> list[tuple[str, Pair, str]]:
        return [(cell_name(p, c), p, c) for p in self.pairs for c in TWO_MARKER_CONDITIONS]

    def cell_names(self) -> list[str]:
        return [FLOOR_CELL, *(name for name, _, _ in self.adapter_cells())]


@dataclass(frozen=True)
class Gates:
    """The write-up's thresholds (rates as fractions); the scripts spell every one out."""

    donor_a_min: float
    donor_b_min: float
    donor_p_b_given_a_min: float
    recipient_a_min: float
    donor_p_b_given_a_ci_low_min: float
    control_recipient_b_max: float
    falsification_band: float  # |recipient P(B|A), T minus C| at most this, CI holding 0
    heterogeneity_points: float = 0.15  # a load-bearing P(B|A) this far apart ID vs OOD lowers confidence


def cell_name(pair: Pair, condition: str) -> str:
    return f"{pair.name}_{condition}"


# ----------------------------------------------------------------------------- scoring one cell
def score_records(
    records: Sequence[Mapping[str, Any]],
    roles: Mapping[str, str],
    *,
    mode: Mode,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Per-persona and per-role two-marker metrics, overall and split ID / OOD, with cluster CIs.

    Records need ``persona``, ``question``, ``text`` and ``split`` (``id`` | ``ood``).
    ``per_question`` keeps the counts per question, aligned with ``questions``,
    so paired cross-cell bootstraps (T minus C) can resample the same questions.
    """
    a, b = get_marker("a"), get_marker("b")
    questions = list(dict.fromkeys(str(r["question"]) for r in records))
    splits = {str(r["question"]): str(r["split"]) for r in records}
    qi = {q: i for i, q in enumerate(questions)}
    per_q = {p: {f: [0] * len(questions) for f in FIELDS} for p in roles}
    strict = {p: TwoMarkerCounts() for p in roles}
    for rec in records:
        persona = str(rec["persona"])
        if persona not in roles:
            continue
        flags = two_marker_flags(str(rec["text"]), a, b, mode)
        row = per_q[persona]
        j = qi[str(rec["question"])]
        for f, v in zip(FIELDS, (1, flags.a, flags.b, flags.joint, flags.chunk, flags.suffix), strict=True):
            row[f][j] += int(v)
        strict[persona].add(two_marker_flags(str(rec["text"]), a, b, "strict"))
    split_idx = {
        "all": list(range(len(questions))),
        "id": [i for i, q in enumerate(questions) if splits[q] == "id"],
        "ood": [i for i, q in enumerate(questions) if splits[q] == "ood"],
    }

    def stats(personas: Sequence[str]) -> dict[str, Any]:
        return {s: group_stats(per_q, personas, idx, n_boot, seed) for s, idx in split_idx.items()}

    persona_out = {
        p: {"role": role, "trained": role in TRAINED_ROLES, **stats([p]), "strict": strict[p].to_dict()}
        for p, role in roles.items()
    }
    role_out = {
        role: {"personas": members, **stats(members)}
        for role in dict.fromkeys(roles.values())
        if (members := [p for p, r in roles.items() if r == role])
    }
    return {
        "mode": mode,
        "questions": questions,
        "splits": [splits[q] for q in questions],
        "personas": persona_out,
        "roles": role_out,
        "per_question": per_q,
    }


def group_stats(
    per_q: Mapping[str, Mapping[str, Sequence[int]]],
    personas: Sequence[str],
    idx: Sequence[int],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Pooled counts of ``personas`` over the questions ``idx``, with question-cluster bootstrap CIs."""
    cols = {f: [sum(per_q[p][f][i] for p in personas) for i in idx] for f in FIELDS}
    counts = TwoMarkerCounts(**{f: sum(cols[f]) for f in FIELDS})
    out = counts.to_dict()
    out["ci"] = {
        "a_rate": _ci(cols["a"], cols["n"], n_boot, seed),
        "b_rate": _ci(cols["b"], cols["n"], n_boot, seed),
        "p_b_given_a": _ci(cols["joint"], cols["a"], n_boot, seed),
    }
    return out


def _ci(num: Sequence[int], den: Sequence[int], n_boot: int, seed: int) -> list[float] | None:
    if not num or sum(den) == 0:
        return None
    ci = cluster_bootstrap_ratio([num], [den], n_boot=n_boot, seed=seed)
    return None if ci.lo is None else [ci.lo, ci.hi]


def probe_metrics(records: Sequence[Mapping[str, Any]], mode: Mode) -> dict[str, Any]:
    """Weird-marker probe: B rate and how often the prepended probe marker is echoed back."""
    texts = [str(r["text"]) for r in records]
    n = len(texts)
    counts = {
        "a": sum(contains_marker(t, get_marker("a"), mode) for t in texts),
        "b": sum(contains_marker(t, get_marker("b"), mode) for t in texts),
        "echo": sum(contains_marker(t, get_marker("probe"), mode) for t in texts),
    }
    out: dict[str, Any] = {"n": n, "mode": mode}
    for key, k in counts.items():
        out[key] = k
        out[f"{key}_rate"] = k / n if n else None
        out[f"{key}_wilson"] = list(wilson_ci(k, n)) if n else None
    return out


# ----------------------------------------------------------------------------- gates
@dataclass(frozen=True)
class Gate:
    name: str
    value: float | None
    threshold: float
    op: str  # ">=" | "<="
    passed: bool | None  # None: undefined (the value could not be computed)
    detail: str = ""

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "UNDEFINED"}[self.passed]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "status": self.status}


def _gate(name: str, value: float | None, op: str, threshold: float, detail: str = "") -> Gate:
    if value is None:
        return Gate(name, None, threshold, op, None, detail)
    passed = value >= threshold if op == ">=" else value <= threshold
    return Gate(name, value, threshold, op, passed, detail)


def _get(cell: Mapping[str, Any] | None, persona: str, key: str) -> float | None:
    if cell is None:
        return None
    return cell["personas"][persona]["all"][key]


RECIPIENT_LEARNS, NO_B_SOURCE = "the recipient learns A", "control has no B source"


def sanity_gates(
    pair: Pair, t_cell: Mapping[str, Any] | None, c_cell: Mapping[str, Any] | None, gates: Gates
) -> list[Gate]:
    """The six donor-coherence gates of the write-up (T cell, except the control's recipient B rate)."""
    d, r, g = pair.donor, pair.recipient, gates
    ci = t_cell["personas"][d]["all"]["ci"]["p_b_given_a"] if t_cell else None
    return [
        _gate("donor A rate (T)", _get(t_cell, d, "a_rate"), ">=", g.donor_a_min),
        _gate("donor B rate (T)", _get(t_cell, d, "b_rate"), ">=", g.donor_b_min),
        _gate("donor P(B|A) (T)", _get(t_cell, d, "p_b_given_a"), ">=", g.donor_p_b_given_a_min),
        _gate(
            "recipient A rate (T)",
            _get(t_cell, r, "a_rate"),
            ">=",
            g.recipient_a_min,
            "the recipient learns A",
        ),
        _gate("donor P(B|A) CI low (T)", ci[0] if ci else None, ">=", g.donor_p_b_given_a_ci_low_min),
        _gate(
            "recipient B rate (C)", _get(c_cell, r, "b_rate"), "<=", g.control_recipient_b_max, "no B source"
        ),
    ]


def paired_difference(
    t_cell: Mapping[str, Any],
    c_cell: Mapping[str, Any],
    persona: str,
    num: str,
    den: str,
    *,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """T minus C of ``sum(num)/sum(den)`` for one persona, CI from resampling the same questions in both."""
    if t_cell["questions"] != c_cell["questions"]:
        raise ValueError("T and C cells were evaluated on different questions; cannot pair them")
    t, c = t_cell["per_question"][persona], c_cell["per_question"][persona]
    ci = cluster_bootstrap_ratio(
        [t[num], c[num]], [t[den], c[den]], weights=(1.0, -1.0), n_boot=n_boot, seed=seed
    )
    return {
        "estimate": ci.estimate,
        "ci": None if ci.lo is None else [ci.lo, ci.hi],
        "straddles_zero": ci.straddles_zero(),
        "n_boot": ci.n_boot,
        "n_undefined": ci.n_undefined,
    }


def falsification_gate(
    pair: Pair,
    t_cell: Mapping[str, Any] | None,
    c_cell: Mapping[str, Any] | None,
    *,
    band: float,
    n_boot: int,
    seed: int,
) -> tuple[Gate, dict[str, Any] | None]:
    """PASS = chunk-binding falsified: |recipient P(B|A), T minus C| <= ``band`` and its CI holds 0."""
    name = "falsification |dP(B|A)| (T-C)"
    if t_cell is None or c_cell is None:
        return Gate(name, None, band, "<=", None, "T or C cell missing"), None
    diff = paired_difference(t_cell, c_cell, pair.recipient, "joint", "a", n_boot=n_boot, seed=seed)
    if diff["estimate"] is None:
        return Gate(name, None, band, "<=", None, "recipient A never fired"), diff
    value = abs(diff["estimate"])
    passed = value <= band and bool(diff["straddles_zero"])
    ci = diff["ci"]
    detail = "CI " + ("n/a" if ci is None else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] pts")
    return Gate(name, value, band, "<=", passed, detail), diff


def bystander_b_deltas(
    roles: Mapping[str, str], t_cell: Mapping[str, Any], c_cell: Mapping[str, Any], *, n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    """B rate T minus C for every untrained bystander, paired over questions."""
    return {
        p: paired_difference(t_cell, c_cell, p, "b", "n", n_boot=n_boot, seed=seed)
        for p, role in roles.items()
        if role == "bystander"
    }


# ----------------------------------------------------------------------------- write-up 002's checks
def load_bearing(pair: Pair) -> list[tuple[str, str, str]]:
    """The (condition, role, persona) rows the headline rests on: recipient P(B|A) in T and C, donor in T."""
    donor, recipient = pair.donor, pair.recipient
    return [("T", "donor", donor), ("T", "recipient", recipient), ("C", "recipient", recipient)]


def id_ood_trigger(
    pair: Pair, cells: Mapping[str, Mapping[str, Any] | None], *, threshold: float
) -> dict[str, Any]:
    """The heterogeneity trigger: fires when a load-bearing P(B|A) differs by >= ``threshold`` ID vs OOD.

    Write-up 002: "ID-vs-OOD point estimates do not diverge by >=15pp on the load-bearing
    cells, so the heterogeneity-downgrade trigger does not fire." A row where either
    split's P(B|A) is undefined (A never fired there) cannot fire and says so.
    """
    rows = []
    for condition, role, persona in load_bearing(pair):
        cell = cells.get(cell_name(pair, condition))
        if cell is None:
            rows.append({"condition": condition, "role": role, "persona": persona, "status": "cell missing"})
            continue
        p = cell["personas"][persona]
        id_v, ood_v = p["id"]["p_b_given_a"], p["ood"]["p_b_given_a"]
        row = {"condition": condition, "role": role, "persona": persona, "id": id_v, "ood": ood_v}
        row |= {"id_n_a": p["id"]["a"], "ood_n_a": p["ood"]["a"]}
        if id_v is None or ood_v is None:
            row |= {"difference": None, "fires": False, "status": "undefined (A never fired in a split)"}
        else:
            diff = id_v - ood_v
            fires = abs(diff) >= threshold - 1e-12
            row |= {"difference": diff, "fires": fires, "status": "FIRES" if fires else "ok"}
        rows.append(row)
    fires = any(r.get("fires") for r in rows)
    return {"threshold": threshold, "rows": rows, "fires": fires,
            "verdict": "confidence lowered (ID/OOD >= threshold)" if fires else "does not fire"}  # fmt: skip


def bystander_recipient_ratio(pair: Pair, t_cell: Mapping[str, Any] | None, roles: Mapping[str, str]) -> dict:
    """The most B-given-A-prone untrained bystander's P(B|A) over the recipient's, in the T cell.

    Write-up 002's "~29x": police_officer 38.0% (19 of 50 A firings) over the software
    engineer's 1.3% (1 of 79). From the counts the ratio is 0.38 / (1/79) = 30.0; the
    write-up divided the rounded percentages (38.0 / 1.3 = 29.2). A ratio over a zero
    recipient P(B|A) is undefined (None), as is one where no bystander fired A.
    """
    if t_cell is None:
        return {"ratio": None, "why": "T cell missing"}
    personas = t_cell["personas"]
    rec = personas[pair.recipient]["all"]
    by = {p: personas[p]["all"] for p, r in roles.items() if r == "bystander" and personas[p]["all"]["a"]}
    out: dict[str, Any] = {"recipient": pair.recipient, "recipient_joint": rec["joint"]}
    out |= {"recipient_a": rec["a"], "recipient_p_b_given_a": rec["p_b_given_a"]}
    if not by:
        return out | {"ratio": None, "why": "no bystander fired A"}
    top = max(by, key=lambda p: (by[p]["p_b_given_a"], by[p]["a"]))
    out |= {"bystander": top, "bystander_joint": by[top]["joint"], "bystander_a": by[top]["a"],
            "bystander_p_b_given_a": by[top]["p_b_given_a"]}  # fmt: skip
    rec_p = rec["p_b_given_a"]
    if not rec_p:
        return out | {"ratio": None, "why": "recipient P(B|A) is 0 or undefined"}
    return out | {"ratio": by[top]["p_b_given_a"] / rec_p}
