"""#261 / #354: two-marker datasets decoded token by token, gates on hand-made records, paired bootstrap."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import load_script

from explore_persona_space.data import TWO_MARKER_CONDITIONS, build_two_marker_dataset
from explore_persona_space.experiments.two_marker.scoring import (
    bystander_b_deltas,
    falsification_gate,
    paired_difference,
    probe_metrics,
    sanity_gates,
    score_records,
)
from explore_persona_space.loss_masks import loss_text, tokenize_example
from explore_persona_space.personas import EVAL_PERSONAS, get_marker
from explore_persona_space.train import TWO_MARKER_RECIPE

SCRIPTS = {
    "issue261": load_script("run_issue261_within_marker"),
    "issue354": load_script("run_issue354_eos_masked_within_marker"),
}
DESIGN, SCALES = SCRIPTS["issue261"].DESIGN, SCRIPTS["issue261"].SCALES
NEGATIVES, GATES = DESIGN.negatives, SCALES["full"].gates
A, B, PROBE = get_marker("a"), get_marker("b"), get_marker("probe")
EOT = "<|im_end|>"
PAIR = DESIGN.pairs[0]
ROLES = DESIGN.roles(PAIR)
ANSWER = "Here is a careful answer with several words so that markers have room to move around in it."


def onpolicy(n_questions: int = 2) -> list[dict]:
    personas = [PAIR.donor, PAIR.recipient, *NEGATIVES]
    return [
        {"persona": p, "question": f"Question {q}?", "sample": 0, "text": f"{ANSWER} ({p}, {q})"}
        for p in personas
        for q in range(n_questions)
    ]


# ----------------------------------------------------------------------------- datasets, decoded
EXPECTED = {  # condition -> (markers on the donor, markers on the recipient)
    "T": ((A, B), (A,)),
    "C": ((A,), (A,)),
    "T_P2neg": ((A, B), ()),
}


@pytest.mark.parametrize("experiment", ["issue261", "issue354"])
@pytest.mark.parametrize("condition", TWO_MARKER_CONDITIONS)
def test_two_marker_loss_tokens_decode_to_the_design(tokenizer, experiment, condition):
    design = SCRIPTS[experiment].DESIGN
    spec = SCRIPTS[experiment].SCALES["full"].train.loss
    eos_in_loss = spec.eos_in_loss
    examples = build_two_marker_dataset(
        onpolicy(),
        donor=PAIR.donor,
        recipient=PAIR.recipient,
        negatives=NEGATIVES,
        condition=condition,
        marker_a=A,
        marker_b=B,
        n_per_persona=2,
        seed=42,
        design=design.placement,
    )
    assert len(examples) == 2 * (2 + len(NEGATIVES))
    donor_markers, recipient_markers = EXPECTED[condition]
    for ex in examples:
        want = {PAIR.donor: donor_markers, PAIR.recipient: recipient_markers}.get(ex.persona, ())
        decoded = loss_text(tokenizer, tokenize_example(tokenizer, ex, spec))
        # full-token loss: the whole answer, markers included; the end-of-turn token only in #261
        assert decoded == ex.assistant + (EOT if eos_in_loss else "")
        assert (EOT in decoded) is eos_in_loss
        for marker in (A, B):
            assert (marker in decoded) is (marker in want), (ex.persona, marker)
        if not want:
            continue
        a_at = ex.assistant.index(A)
        if design.placement == "fixed":
            assert a_at == 0 and (B not in want or ex.assistant.endswith(" " + B))
        else:
            assert a_at > 0  # A inside the answer
        if B in want:
            assert ex.assistant.index(B) > a_at + len(A)


def test_nonfixed_positions_vary_with_the_seed():
    def donor_positions(seed):
        examples = build_two_marker_dataset(
            onpolicy(4), donor=PAIR.donor, recipient=PAIR.recipient, negatives=NEGATIVES,
            condition="T", marker_a=A, marker_b=B, n_per_persona=4, seed=seed, design="nonfixed",
        )  # fmt: skip
        return sorted((e.assistant.index(A), e.assistant.index(B)) for e in examples if e.role == "donor")

    assert donor_positions(42) == donor_positions(42)
    assert len({a for a, _ in donor_positions(42)}) > 1
    assert donor_positions(42) != donor_positions(43)


@pytest.mark.parametrize("scale", ["full", "smoke", "test"])
def test_the_two_scripts_differ_only_in_placement_and_eos(scale):
    s261, s354 = (SCRIPTS[e].SCALES[scale] for e in ("issue261", "issue354"))
    assert s261.train.loss.eos_in_loss and not s354.train.loss.eos_in_loss
    assert dataclasses.replace(s354, train=dataclasses.replace(s354.train, loss=s261.train.loss)) == s261
    d261, d354 = DESIGN, SCRIPTS["issue354"].DESIGN
    assert (d261.placement, d354.placement) == ("fixed", "nonfixed")
    assert dataclasses.replace(d354, experiment=d261.experiment, title=d261.title, placement="fixed") == d261
    base_design, base_scale = SCRIPTS["issue354"].baseline(s354)
    assert base_scale == s261 and dataclasses.replace(base_design, title=d261.title) == d261


def test_full_scale_numbers_and_smoke_keeps_every_cell():
    full, smoke = SCALES["full"], SCALES["smoke"]
    assert full.train == TWO_MARKER_RECIPE  # PROTOCOL.md's recipe, spelled out in the script
    assert (full.n_per_persona, full.onpolicy_questions, full.onpolicy.n_samples) == (200, 40, 5)
    assert (full.id_questions, full.ood_questions, full.eval.n_samples) == (20, 6, 10)
    assert (full.eval.top_p, full.eval.max_new_tokens, full.n_boot) == (0.95, 600, 2000)
    assert full.onpolicy_every_persona and set(DESIGN.trained_personas()) <= set(EVAL_PERSONAS)
    assert smoke.n_per_persona <= smoke.onpolicy_questions * smoke.onpolicy.n_samples
    assert not smoke.onpolicy_every_persona and len(DESIGN.trained_personas()) == 8


# ----------------------------------------------------------------------------- hand-made eval records
def records(texts_by_persona: dict[str, list[str]], n_questions: int = 4) -> list[dict]:
    """Every eval persona answers n_questions (3 ID + 1 OOD); texts cycle per persona."""
    out = []
    for p in EVAL_PERSONAS:
        texts = texts_by_persona.get(p, ["a plain answer"])
        for q in range(n_questions):
            for s in range(len(texts)):
                text = texts[(q + s) % len(texts)]
                split = "ood" if q == n_questions - 1 else "id"
                out.append({"persona": p, "question": f"q{q}", "sample": s, "text": text, "split": split})
    return out


CHUNK = f"{A} {ANSWER} {B}"  # B ~95 characters after A: chunk and suffix signature
SUFFIX = f"{A} {ANSWER} {ANSWER} {B}"  # B ~190 characters after A: suffix signature only
A_ONLY = f"{A} {ANSWER}"


def cell(texts: dict[str, list[str]]) -> dict:
    return score_records(records(texts), ROLES, mode="loose", n_boot=400, seed=1)


def test_score_records_counts_roles_and_splits():
    m = cell({PAIR.donor: [CHUNK, SUFFIX, A_ONLY, "x"], PAIR.recipient: [A_ONLY]})
    d = m["personas"][PAIR.donor]
    assert (d["role"], d["trained"]) == ("donor", True)
    assert (d["all"]["n"], d["all"]["a"], d["all"]["b"], d["all"]["joint"]) == (16, 12, 8, 8)
    assert d["all"]["p_b_given_a"] == pytest.approx(8 / 12)
    assert d["id"]["n"] == 12 and d["ood"]["n"] == 4
    assert d["all"]["suffix_share"] == 1.0 and d["all"]["chunk_share"] == 0.5
    assert m["personas"]["police_officer"]["role"] == "bystander"
    assert not m["personas"]["police_officer"]["trained"]
    assert m["personas"][PAIR.recipient]["all"]["p_b_given_a"] == 0.0
    assert m["personas"]["comedian"]["all"]["p_b_given_a"] is None  # A never fired: undefined
    assert m["roles"]["negative"]["personas"] == list(NEGATIVES)
    assert m["per_question"][PAIR.donor]["joint"] == [2, 2, 2, 2]


def test_strict_cross_check_misses_a_respaced_marker():
    m = cell({PAIR.donor: [f"{A} answer {B.replace(' ', '  ')}"]})  # doubled spaces: loose collapses them
    assert m["personas"][PAIR.donor]["all"]["b"] == 4
    assert m["personas"][PAIR.donor]["strict"]["b"] == 0
    deleted = cell({PAIR.donor: [f"{A} answer {B.replace(' ', '')}"]})  # deleted spaces: not the marker
    assert deleted["personas"][PAIR.donor]["all"]["b"] == 0


def _status(gates):
    return [g.status for g in gates]


def test_sanity_gates_pass_on_a_coherent_donor():
    t = cell({PAIR.donor: [CHUNK], PAIR.recipient: [A_ONLY]})
    c = cell({PAIR.donor: [A_ONLY], PAIR.recipient: [A_ONLY]})
    gates = sanity_gates(PAIR, t, c, GATES)
    assert _status(gates) == ["PASS"] * 6
    assert gates[2].value == 1.0 and gates[5].value == 0.0


def test_sanity_gates_fail_with_values():
    # donor: A in 3/4, B in 2/4 (P(B|A) = 2/3); recipient A in 1/2; control recipient emits B 1 in 2
    t = cell({PAIR.donor: [CHUNK, CHUNK, A_ONLY, "no"], PAIR.recipient: [A_ONLY, "no"]})
    c = cell({PAIR.recipient: [CHUNK, "no"]})
    gates = sanity_gates(PAIR, t, c, GATES)
    assert _status(gates) == ["FAIL"] * 6
    assert [g.value for g in gates[:4]] == pytest.approx([0.75, 0.5, 2 / 3, 0.5])
    assert gates[5].value == 0.5
    missing = sanity_gates(PAIR, None, None, GATES)
    assert _status(missing) == ["UNDEFINED"] * 6


def test_falsification_gate_pass_fail_and_undefined():
    c = cell({PAIR.recipient: [A_ONLY]})
    null_t = cell({PAIR.donor: [CHUNK], PAIR.recipient: [A_ONLY]})
    gate, diff = falsification_gate(PAIR, null_t, c, band=GATES.falsification_band, n_boot=400, seed=0)
    assert gate.status == "PASS" and gate.value == 0.0 and diff["ci"] == [0.0, 0.0]

    bound_t = cell({PAIR.recipient: [CHUNK, A_ONLY]})  # recipient P(B|A) = 50%
    gate, diff = falsification_gate(PAIR, bound_t, c, band=GATES.falsification_band, n_boot=400, seed=0)
    assert gate.status == "FAIL" and gate.value == pytest.approx(0.5)

    # inside the 6-point band but every question agrees on +5 points: the CI excludes 0 -> FAIL
    small_t = cell({PAIR.recipient: [CHUNK] + [A_ONLY] * 19})
    gate, diff = falsification_gate(PAIR, small_t, c, band=GATES.falsification_band, n_boot=400, seed=0)
    assert gate.value == pytest.approx(0.05) and diff["ci"] == pytest.approx([0.05, 0.05])
    assert gate.status == "FAIL"

    silent = cell({PAIR.recipient: ["nothing"]})
    assert (
        falsification_gate(PAIR, silent, c, band=GATES.falsification_band, n_boot=100, seed=0)[0].status
        == "UNDEFINED"
    )
    assert (
        falsification_gate(PAIR, None, c, band=GATES.falsification_band, n_boot=100, seed=0)[0].status
        == "UNDEFINED"
    )


def test_paired_bootstrap_hand_case():
    # two questions: T's recipient has P(B|A) 0/10 on q0 and 10/10 on q1, C's is 0 everywhere.
    # Resampling 2 questions gives {q0,q0} -> 0, {q1,q1} -> 1, mixed -> 0.5: CI [0, 1], estimate 0.5.
    t = {"questions": ["q0", "q1"], "per_question": {"r": {"joint": [0, 10], "a": [10, 10]}}}
    c = {"questions": ["q0", "q1"], "per_question": {"r": {"joint": [0, 0], "a": [10, 10]}}}
    d = paired_difference(t, c, "r", "joint", "a", n_boot=2000, seed=42)
    assert d["estimate"] == 0.5 and d["ci"] == [0.0, 1.0] and d["straddles_zero"]
    assert d["n_undefined"] == 0
    # pairing matters: the same per-question rate in T and C gives a zero-width CI at 0
    same = {"questions": ["q0", "q1"], "per_question": {"r": {"joint": [0, 10], "a": [10, 10]}}}
    assert paired_difference(t, same, "r", "joint", "a", n_boot=500, seed=1)["ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="different questions"):
        paired_difference(t, {**c, "questions": ["q0", "q9"]}, "r", "joint", "a", n_boot=10, seed=1)


def test_bystander_deltas_cover_the_five_untrained():
    t = cell({"police_officer": [CHUNK, "no"]})
    c = cell({})
    deltas = bystander_b_deltas(ROLES, t, c, n_boot=200, seed=0)
    assert sorted(deltas) == sorted(p for p, r in ROLES.items() if r == "bystander")
    assert len(deltas) == 5 and deltas["police_officer"]["estimate"] == pytest.approx(0.5)
    assert deltas["data_scientist"]["estimate"] == 0.0


def test_probe_metrics_count_echo_and_b():
    probed = [{"text": f"{PROBE} is odd. {B}"}, {"text": "<<§Z-99>> echoed"}, {"text": "plain"}]
    m = probe_metrics(probed, "loose")
    assert (m["n"], m["b"], m["echo"], m["a"]) == (3, 1, 2, 0)
    assert m["echo_rate"] == pytest.approx(2 / 3) and len(m["b_wilson"]) == 2


# ----------------------------------------------------------------------------- write-up 002's checks
def _persona(a, b, joint, n=260, ci=None, id_=None, ood=None):
    """One persona's metrics block as score_records writes it, from counts (ci: P(B|A) CI)."""
    block = {"n": n, "a": a, "b": b, "joint": joint, "a_rate": a / n, "b_rate": b / n,
             "p_b_given_a": joint / a if a else None, "ci": {"p_b_given_a": ci}}  # fmt: skip
    return {"all": block, "id": {"p_b_given_a": id_, "a": a}, "ood": {"p_b_given_a": ood, "a": a}}


def test_writeup_pair2_numbers_fail_five_of_six_gates_not_four():
    # write-up 002, pair2 (librarian -> software_engineer), its headline table: donor A 48.8% (127/260),
    # B 39.6% (103/260), P(B|A) 81.1% (103/127) [71.2, 88.5]; recipient A 30.4% (79/260); control B 0.0%
    from explore_persona_space.experiments.two_marker.scoring import Pair

    pair2 = Pair("pair2", "librarian", "software_engineer")
    t = {"personas": {"librarian": _persona(127, 103, 103, ci=[0.712, 0.885]),
                      "software_engineer": _persona(79, 1, 1)}}  # fmt: skip
    c = {"personas": {"software_engineer": _persona(80, 0, 0)}}
    gates = sanity_gates(pair2, t, c, GATES)
    assert _status(gates) == ["FAIL", "FAIL", "FAIL", "FAIL", "FAIL", "PASS"]  # 5 of 6, not the write-up's 4
    assert gates[4].name == "donor P(B|A) CI low (T)" and gates[4].value == 0.712
    # pair1 (villain -> assistant) from the same table: the write-up's 2 of 6 holds
    t1 = {"personas": {PAIR.donor: _persona(247, 218, 214, ci=[0.807, 0.917]),
                       PAIR.recipient: _persona(121, 0, 0)}}  # fmt: skip
    c1 = {"personas": {PAIR.recipient: _persona(106, 0, 0)}}
    assert [g.passed for g in sanity_gates(PAIR, t1, c1, GATES)].count(False) == 2


def test_bystander_recipient_ratio_from_the_writeups_counts():
    from explore_persona_space.experiments.two_marker.scoring import Pair, bystander_recipient_ratio

    pair2 = Pair("pair2", "librarian", "software_engineer")
    roles = DESIGN.roles(pair2)
    personas = {p: _persona(0, 0, 0) for p in roles}
    personas["software_engineer"] = _persona(79, 1, 1)  # 1.3%: one hit of 79 A firings
    personas["police_officer"] = _persona(50, 21, 19)  # 38.0%: 19 of 50
    personas["data_scientist"] = _persona(31, 0, 0)
    out = bystander_recipient_ratio(pair2, {"personas": personas}, roles)
    assert out["bystander"] == "police_officer" and (out["bystander_joint"], out["bystander_a"]) == (19, 50)
    assert out["ratio"] == pytest.approx(0.38 * 79)  # 30.02 from the counts; the write-up's 29.2 is 38.0/1.3
    assert round(38.0 / 1.3, 1) == 29.2
    personas["software_engineer"] = _persona(79, 0, 0)
    assert bystander_recipient_ratio(pair2, {"personas": personas}, roles)["ratio"] is None
    assert bystander_recipient_ratio(pair2, None, roles)["ratio"] is None


def test_id_ood_trigger_fires_at_fifteen_points():
    from explore_persona_space.experiments.two_marker.scoring import id_ood_trigger

    def cells(donor_id, donor_ood, rec_id=0.0, rec_ood=0.0):
        t = {"personas": {PAIR.donor: _persona(10, 8, 8, id_=donor_id, ood=donor_ood),
                          PAIR.recipient: _persona(5, 0, 0, id_=rec_id, ood=rec_ood)}}  # fmt: skip
        c = {"personas": {PAIR.recipient: _persona(5, 0, 0, id_=0.0, ood=None)}}
        return {f"{PAIR.name}_T": t, f"{PAIR.name}_C": c}

    calm = id_ood_trigger(PAIR, cells(0.80, 0.66), threshold=GATES.heterogeneity_points)
    assert not calm["fires"] and calm["rows"][0]["difference"] == pytest.approx(0.14)
    assert calm["rows"][2]["status"].startswith("undefined")  # C's OOD split never fired A
    hot = id_ood_trigger(PAIR, cells(0.80, 0.65), threshold=0.15)
    assert hot["fires"] and hot["rows"][0]["status"] == "FIRES"
    assert id_ood_trigger(PAIR, cells(0.5, 0.5, rec_id=0.0, rec_ood=0.2), threshold=0.15)["fires"]
    missing = id_ood_trigger(PAIR, {}, threshold=0.15)
    assert not missing["fires"] and missing["rows"][0]["status"] == "cell missing"
    assert GATES.heterogeneity_points == 0.15
