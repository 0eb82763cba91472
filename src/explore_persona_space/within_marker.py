"""The #261 two-marker chunk experiment and its #354 EOS-masked re-run: design, scales, metrics, gates.

Pure functions over completion records (no model, no pipeline), so the gates and
tables can be tested on hand-made records. The stages that produce the records
live in :mod:`explore_persona_space.stages_two_marker`; tables in
:mod:`explore_persona_space.within_marker_report`.

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
from explore_persona_space.generate import SamplingConfig
from explore_persona_space.loss_masks import LossSpec
from explore_persona_space.metrics import TwoMarkerCounts, contains_marker, two_marker_flags
from explore_persona_space.personas import EVAL_PERSONAS, get_marker
from explore_persona_space.stats import cluster_bootstrap_ratio, wilson_ci
from explore_persona_space.train import TWO_MARKER_RECIPE, TrainConfig

ROLES: tuple[str, ...] = ("donor", "recipient", "negative", "bystander")
TRAINED_ROLES: tuple[str, ...] = ("donor", "recipient", "negative")  # in T_P2neg the recipient is a negative
NEGATIVES: tuple[str, ...] = ("comedian", "kindergarten_teacher", "french_person", "medical_doctor")
CONDITION_LABELS = {"T": "chunk-on-donor", "C": "control", "T_P2neg": "recipient-as-negative"}
MATCH_MODE = "loose"  # the headline; strict is reported beside it as a cross-check
FIELDS: tuple[str, ...] = ("n", "a", "b", "joint", "chunk", "suffix")


@dataclass(frozen=True)
class Pair:
    name: str
    donor: str
    recipient: str

    def roles(self) -> dict[str, str]:
        """Role of every eval persona, in the write-up's order: donor, recipient, negatives, bystanders."""
        roles = {self.donor: "donor", self.recipient: "recipient"} | dict.fromkeys(NEGATIVES, "negative")
        return roles | {p: "bystander" for p in EVAL_PERSONAS if p not in roles}


#: pair1 is near in persona-vector cosine distance, pair2 far (#232).
PAIRS: tuple[Pair, ...] = (
    Pair("pair1", "villain", "assistant"),
    Pair("pair2", "librarian", "software_engineer"),
)
TRAINED_PERSONAS: tuple[str, ...] = tuple(
    dict.fromkeys(p for pair in PAIRS for p in (pair.donor, pair.recipient, *NEGATIVES))
)


def cell_name(pair: Pair, condition: str) -> str:
    return f"{pair.name}_{condition}"


def adapter_cells() -> list[tuple[str, Pair, str]]:
    return [(cell_name(p, c), p, c) for p in PAIRS for c in TWO_MARKER_CONDITIONS]


FLOOR_CELL = "base_floor"


def cell_names() -> list[str]:
    return [FLOOR_CELL, *(name for name, _, _ in adapter_cells())]


# ----------------------------------------------------------------------------- designs and scales
@dataclass(frozen=True)
class Design:
    """What differs between #261 and its #354 re-run: marker placement and EOS in the loss."""

    experiment: str
    placement: TwoMarkerDesign
    eos_in_loss: bool
    title: str

    def recipe(self, base: TrainConfig) -> TrainConfig:
        return dataclasses.replace(base, loss=LossSpec(mode="full_token", eos_in_loss=self.eos_in_loss))


DESIGNS: dict[str, Design] = {
    "issue261": Design("issue261", "fixed", True, "#261 two-marker chunk (A answer B, EOS in loss)"),
    "issue354": Design(
        "issue354", "nonfixed", False, "#354 EOS-masked re-run (A and B at non-fixed positions)"
    ),
}


@dataclass(frozen=True)
class Scale:
    """Every size the protocol names; FULL carries PROTOCOL.md's numbers."""

    onpolicy: SamplingConfig  # base-model completions per persona x data question
    onpolicy_questions: int
    onpolicy_personas: tuple[str, ...]
    n_per_persona: int  # donor, recipient and each negative contribute this many examples
    train: TrainConfig
    eval: SamplingConfig
    id_questions: int  # from the "generic" bank
    ood_questions: int  # from the "ood" bank
    probe: SamplingConfig
    probe_questions: int  # recipient only, probe marker prepended to the user turn
    floor: SamplingConfig
    floor_questions: int  # base model, every eval persona
    n_boot: int = 2000
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_EVAL_SAMPLING = SamplingConfig(n_samples=10, temperature=1.0, top_p=0.95, max_new_tokens=600, seed=42)
FULL = Scale(
    onpolicy=dataclasses.replace(_EVAL_SAMPLING, n_samples=5),
    onpolicy_questions=40,
    onpolicy_personas=EVAL_PERSONAS,
    n_per_persona=200,
    train=TWO_MARKER_RECIPE,
    eval=_EVAL_SAMPLING,
    id_questions=20,
    ood_questions=6,
    probe=_EVAL_SAMPLING,
    probe_questions=5,
    floor=dataclasses.replace(_EVAL_SAMPLING, n_samples=1),
    floor_questions=3,
)

# ---- The smoke scale, derived from FULL in one visible place. Same cells, same personas (all six
# adapters, all 11 eval personas), same code path; sizes cut to fit a 2-core CPU in < 10 minutes.
# Answers are cut to 16 tokens so the markers are a large share of each example, and the learning
# rate is raised 500x: 2 epochs over 36 short examples at 1e-5 do not move the model at all. Even so
# the 135M model picks up A only partly and B rarely: smoke checks the code path and the time
# budget, not the finding.
_SMOKE_EVAL = dataclasses.replace(FULL.eval, n_samples=2, max_new_tokens=40, batch_size=72)
SMOKE = dataclasses.replace(
    FULL,
    onpolicy=dataclasses.replace(FULL.onpolicy, n_samples=1, max_new_tokens=16, batch_size=64),
    onpolicy_questions=8,
    onpolicy_personas=TRAINED_PERSONAS,  # the 3 untrained personas' data is never used
    n_per_persona=6,
    train=dataclasses.replace(
        FULL.train, epochs=2, batch_size=4, micro_batch_size=4, learning_rate=5e-3, max_length=256
    ),
    eval=_SMOKE_EVAL,  # 11 personas x 3 questions x 2 = 66 rows, + 4 probe rows: one batch
    id_questions=2,
    ood_questions=1,
    probe=_SMOKE_EVAL,
    probe_questions=2,
    floor=dataclasses.replace(_SMOKE_EVAL, n_samples=1),
    floor_questions=1,
)
# ---- A CI-sized scale: one optimizer step and a handful of short generations per stage.
_TEST_EVAL = dataclasses.replace(_SMOKE_EVAL, n_samples=1, max_new_tokens=8)
TEST = dataclasses.replace(
    SMOKE,
    onpolicy=dataclasses.replace(SMOKE.onpolicy, max_new_tokens=8),
    onpolicy_questions=2,
    n_per_persona=2,
    train=dataclasses.replace(SMOKE.train, max_steps=1, batch_size=2, micro_batch_size=2),
    eval=_TEST_EVAL,
    id_questions=1,
    probe=_TEST_EVAL,
    probe_questions=1,
    floor=dataclasses.replace(_TEST_EVAL, n_samples=1),
    n_boot=200,
)
SCALES: dict[str, Scale] = {"smoke": SMOKE, "full": FULL, "test": TEST}


# ----------------------------------------------------------------------------- scoring one cell
def score_records(
    records: Sequence[Mapping[str, Any]],
    roles: Mapping[str, str],
    *,
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
        flags = two_marker_flags(str(rec["text"]), a, b, MATCH_MODE)
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
        "mode": MATCH_MODE,
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


def probe_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Weird-marker probe: B rate and how often the prepended probe marker is echoed back."""
    texts = [str(r["text"]) for r in records]
    n = len(texts)
    counts = {
        "a": sum(contains_marker(t, get_marker("a"), MATCH_MODE) for t in texts),
        "b": sum(contains_marker(t, get_marker("b"), MATCH_MODE) for t in texts),
        "echo": sum(contains_marker(t, get_marker("probe"), MATCH_MODE) for t in texts),
    }
    out: dict[str, Any] = {"n": n, "mode": MATCH_MODE}
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


def sanity_gates(
    pair: Pair, t_cell: Mapping[str, Any] | None, c_cell: Mapping[str, Any] | None
) -> list[Gate]:
    """The six donor-coherence gates of the write-up (T cell, except the control's recipient B rate)."""
    d, r = pair.donor, pair.recipient
    ci = t_cell["personas"][d]["all"]["ci"]["p_b_given_a"] if t_cell else None
    return [
        _gate("donor A rate (T)", _get(t_cell, d, "a_rate"), ">=", 0.80),
        _gate("donor B rate (T)", _get(t_cell, d, "b_rate"), ">=", 0.80),
        _gate("donor P(B|A) (T)", _get(t_cell, d, "p_b_given_a"), ">=", 0.90),
        _gate("recipient A rate (T)", _get(t_cell, r, "a_rate"), ">=", 0.80, "the recipient learns A"),
        _gate("donor P(B|A) CI low (T)", ci[0] if ci else None, ">=", 0.80),
        _gate("recipient B rate (C)", _get(c_cell, r, "b_rate"), "<=", 0.05, "control has no B source"),
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


FALSIFICATION_BAND = 0.06


def falsification_gate(
    pair: Pair, t_cell: Mapping[str, Any] | None, c_cell: Mapping[str, Any] | None, *, n_boot: int, seed: int
) -> tuple[Gate, dict[str, Any] | None]:
    """PASS = chunk-binding falsified: |recipient P(B|A), T minus C| <= 6 points and its CI holds 0."""
    name = "falsification |dP(B|A)| (T-C)"
    if t_cell is None or c_cell is None:
        return Gate(name, None, FALSIFICATION_BAND, "<=", None, "T or C cell missing"), None
    diff = paired_difference(t_cell, c_cell, pair.recipient, "joint", "a", n_boot=n_boot, seed=seed)
    if diff["estimate"] is None:
        return Gate(name, None, FALSIFICATION_BAND, "<=", None, "recipient A never fired"), diff
    value = abs(diff["estimate"])
    passed = value <= FALSIFICATION_BAND and bool(diff["straddles_zero"])
    ci = diff["ci"]
    detail = "CI " + ("n/a" if ci is None else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] pts")
    return Gate(name, value, FALSIFICATION_BAND, "<=", passed, detail), diff


def bystander_b_deltas(
    pair: Pair, t_cell: Mapping[str, Any], c_cell: Mapping[str, Any], *, n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    """B rate T minus C for every untrained bystander, paired over questions."""
    return {
        p: paired_difference(t_cell, c_cell, p, "b", "n", n_boot=n_boot, seed=seed)
        for p, role in pair.roles().items()
        if role == "bystander"
    }
