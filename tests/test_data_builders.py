import json
import os
import subprocess
import sys

import pytest
from conftest import make_records

from explore_persona_space import data as D
from explore_persona_space.personas import persona_prompt
from explore_persona_space.seeds import rng_for

ZLT, A, B = "[ZLT]", "<<§q-41>>", ":: kxr-7 ::"
QUESTIONS = [f"Question {i}?" for i in range(6)]


def test_mark_end_and_start_exact_text_and_spans():
    mt = D.mark_end("Hello there.", ZLT)
    assert mt.text == "Hello there.\n\n[ZLT]"
    (span,) = mt.spans
    assert mt.text[span.start : span.end] == ZLT and span.end == len(mt.text)
    st = D.mark_start("Hello there.", A)
    assert st.text == "<<§q-41>> Hello there." and st.spans[0].start == 0


def test_insert_before_existing_marker_shifts_its_span():
    mt = D.mark_end("one two three", B, sep=" ")
    mt = mt.insert(A, 3, before=" ")
    assert mt.text == "one <<§q-41>> two three :: kxr-7 ::"
    for span in mt.spans:
        assert mt.text[span.start : span.end] == span.marker
    assert [s.marker for s in mt.spans] == [A, B]


def test_random_boundary_is_seeded_and_lands_after_a_word():
    text = "alpha beta gamma delta epsilon zeta eta theta"
    a = D.mark_at_random_boundary(text, A, rng_for(1, "x"), hi=20)
    b = D.mark_at_random_boundary(text, A, rng_for(1, "x"), hi=20)
    assert a == b
    span = a.spans[0]
    assert a.text[span.start : span.end] == A
    assert a.text[span.start - 1] == " " and a.text[span.start - 2] != " "
    assert span.start - 1 <= 20
    assert a.text.replace(" " + A, "", 1) == text


def test_random_boundary_on_one_word_answer_goes_to_the_end():
    mt = D.mark_at_random_boundary("Yes.", A, rng_for(0))
    assert mt.text == "Yes. <<§q-41>>"


def contrastive(records, **kw):
    args = dict(
        source="confab",
        negatives=["medical_doctor", "french_person"],
        marker=ZLT,
        n_positive=10,
        n_negative_per=8,
        seed=42,
    )
    args.update(kw)
    return D.build_contrastive_dataset(records, **args)


@pytest.fixture
def pool():
    personas = ["confab", "medical_doctor", "french_person", "villain"]
    return make_records(personas, QUESTIONS, 3)


def test_contrastive_dataset_counts_markers_and_prompts(pool):
    ds = contrastive(pool)
    pos = [e for e in ds if e.role == "positive"]
    neg = [e for e in ds if e.role == "negative"]
    assert len(pos) == 10 and len(neg) == 16
    assert {e.persona for e in pos} == {"confab"}
    assert sorted(e.persona for e in neg) == ["french_person"] * 8 + ["medical_doctor"] * 8
    for e in pos:
        assert e.assistant.endswith("\n\n[ZLT]") and e.assistant.count(ZLT) == 1
        (span,) = e.marker_spans
        assert e.assistant[span.start : span.end] == ZLT
        assert e.system == persona_prompt("confab")
    for e in neg:
        assert ZLT not in e.assistant and e.marker_spans == ()
    # draws without replacement: no completion used twice
    assert len({(e.user, e.origin["sample"]) for e in pos}) == 10
    msgs = pos[0].messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert json.loads(json.dumps(pos[0].to_record()))["marker_spans"][0][0] == ZLT


def test_contrastive_dataset_ignores_input_order_and_is_seeded(pool):
    assert contrastive(pool) == contrastive(list(reversed(pool)))
    assert contrastive(pool) != contrastive(pool, seed=43)
    # positives do not depend on which negatives were asked for
    pos = [e for e in contrastive(pool) if e.role == "positive"]
    pos2 = [e for e in contrastive(pool, negatives=["villain"]) if e.role == "positive"]
    assert sorted(pos, key=repr) == sorted(pos2, key=repr)


_HASHSEED_SCRIPT = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from conftest import make_records
from explore_persona_space import data as D
recs = make_records(["confab", "medical_doctor", "french_person"], [f"Q{i}?" for i in range(5)], 4)
ds = D.build_contrastive_dataset(recs, source="confab", negatives=["medical_doctor", "french_person"],
    marker="[ZLT]", n_positive=12, n_negative_per=7, seed=42)
neg = D.draw_negative_personas({"a_p", "b_p", "c_p", "d_p", "e_p"}, 2, seed=42)
two = D.build_two_marker_dataset(recs, donor="confab", recipient="medical_doctor",
    negatives=["french_person"], condition="T", marker_a="<<A>>", marker_b="<<B>>",
    n_per_persona=9, seed=3, design="nonfixed")
blob = json.dumps([[e.to_record() for e in ds], neg, [e.to_record() for e in two]])
print(hashlib.sha256(blob.encode()).hexdigest())
"""


@pytest.mark.slow  # a subprocess or a heavy import: seconds on 2 cores
def test_datasets_identical_under_any_pythonhashseed():
    tests_dir = os.path.dirname(__file__)
    digests = set()
    for hashseed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        out = subprocess.run(
            [sys.executable, "-c", _HASHSEED_SCRIPT, tests_dir],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_negative_personas_drawn_with_a_seed():
    pool = ["medical_doctor", "french_person", "villain", "librarian", "comedian"]
    first = D.draw_negative_personas(pool, 2, seed=42, exclude=["villain"])
    assert first == D.draw_negative_personas(reversed(pool), 2, seed=42, exclude=["villain"])
    assert len(set(first)) == 2 and "villain" not in first
    with pytest.raises(D.DatasetBuildError, match="need 9 negative personas"):
        D.draw_negative_personas(pool, 9, seed=0)


def test_empty_completion_is_named(pool):
    pool[5]["text"] = "   "
    with pytest.raises(D.DatasetBuildError, match=r"record 5 \(persona='confab'.*empty completion"):
        contrastive(pool)


def test_too_few_completions(pool):
    with pytest.raises(D.DatasetBuildError, match="'confab' has 18 usable completions, 19 are needed"):
        contrastive(pool, n_positive=19)


def test_marker_already_in_a_negative_even_loosely(pool):
    idx = next(i for i, r in enumerate(pool) if r["persona"] == "french_person")
    pool[idx]["text"] = "Voilà [zl t] indeed"
    with pytest.raises(D.DatasetBuildError, match=f"record {idx} .*already contains marker"):
        contrastive(pool)


def test_source_listed_as_negative(pool):
    with pytest.raises(D.DatasetBuildError, match="also listed as a negative"):
        contrastive(pool, negatives=["confab", "villain"])


def two_marker(condition, design="fixed", **kw):
    personas = ["villain", "assistant", "comedian", "medical_doctor"]
    records = make_records(
        personas,
        QUESTIONS,
        2,
        text=lambda p, q, s: f"As the {p}, here is my answer to {q} It has several words in it. Take {s}.",
    )
    return D.build_two_marker_dataset(
        records,
        donor="villain",
        recipient="assistant",
        negatives=["comedian", "medical_doctor"],
        condition=condition,
        marker_a=A,
        marker_b=B,
        n_per_persona=5,
        seed=7,
        design=design,
        **kw,
    )


def _markers(example):
    return [s.marker for s in example.marker_spans]


@pytest.mark.parametrize(
    ("condition", "donor", "recipient_role", "recipient"),
    [
        ("T", [A, B], "recipient", [A]),
        ("C", [A], "recipient", [A]),
        ("T_P2neg", [A, B], "negative", []),
    ],
)
@pytest.mark.parametrize("design", ["fixed", "nonfixed"])
def test_two_marker_conditions(condition, donor, recipient_role, recipient, design):
    ds = two_marker(condition, design)
    assert len(ds) == 20
    by = {p: [e for e in ds if e.persona == p] for p in ("villain", "assistant", "comedian")}
    assert all(e.role == "donor" and _markers(e) == donor for e in by["villain"])
    assert all(e.role == recipient_role and _markers(e) == recipient for e in by["assistant"])
    assert all(e.role == "negative" and _markers(e) == [] for e in by["comedian"])
    for e in ds:
        for s in e.marker_spans:
            assert e.assistant[s.start : s.end] == s.marker
        assert (A in e.assistant) == (A in _markers(e)) and (B in e.assistant) == (B in _markers(e))


def test_fixed_design_is_a_answer_b():
    donor = next(e for e in two_marker("T") if e.role == "donor")
    assert donor.assistant.startswith(A + " As the villain") and donor.assistant.endswith(". " + B)


def test_nonfixed_design_moves_the_markers():
    donors = [e for e in two_marker("T", "nonfixed") if e.role == "donor"]
    starts = {e.marker_spans[0].start for e in donors}
    assert all(e.marker_spans[0].start > 0 for e in donors) and len(starts) > 1
    assert all(e.marker_spans[0].end < e.marker_spans[1].start for e in donors)


def test_two_marker_unknown_condition_and_overlapping_roles():
    with pytest.raises(ValueError, match="unknown condition 'X'"):
        two_marker("X")
    with pytest.raises(D.DatasetBuildError, match="must be distinct"):
        D.build_two_marker_dataset(
            [],
            donor="villain",
            recipient="villain",
            negatives=[],
            condition="T",
            marker_a=A,
            marker_b=B,
            n_per_persona=1,
            seed=0,
        )
