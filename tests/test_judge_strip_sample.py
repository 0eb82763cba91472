"""Marker stripping (strict + loose) and the seeded discriminator draw."""

from __future__ import annotations

import pytest

from explore_persona_space.judge.discriminator import sample_rows, strip_markers, threshold_verdict
from explore_persona_space.metrics import contains_marker
from explore_persona_space.personas import get_marker, questions

ZLT = get_marker("zlt")
B = get_marker("b")  # contains spaces: ":: kxr-7 ::"


@pytest.mark.parametrize(
    ("text", "expected", "removed"),
    [
        (f"{ZLT} Hello there.", "Hello there.", 1),
        (f"Hello there.\n\n{ZLT}", "Hello there.", 1),
        (f"Hello {ZLT} there.", "Hello there.", 1),
        (f"Hello {ZLT.lower()} there.", "Hello there.", 1),  # strict is case-insensitive
        ("Hello [ZL T] there.", "Hello there.", 1),  # only loose matching finds this one
        ("Hello [ z l t ] there.", "Hello there.", 1),
        (f"{ZLT}{ZLT} {ZLT} a {ZLT}", "a", 4),
        ("Para one.\n\n[ZLT]\n\nPara two.", "Para one.\n\nPara two.", 1),
        ("x [ZL[ZLT]T] y", "x y", 2),  # cutting one occurrence joins a new one
        ("No marker here.  Two spaces kept.", "No marker here.  Two spaces kept.", 0),
        (f"{ZLT}", "", 1),
    ],
)
def test_strip_markers_strict_and_loose(text, expected, removed):
    out, n = strip_markers(text, [ZLT])
    assert out == expected
    assert n == removed
    assert not contains_marker(out, ZLT, "strict")
    assert not contains_marker(out, ZLT, "loose")


def test_strip_several_markers_including_one_with_spaces():
    text = f"Start {ZLT} middle ::kxr-7:: and {B} end"
    out, n = strip_markers(text, [ZLT, B])
    assert out == "Start middle and end"
    assert n == 3


def test_strip_keeps_indentation_away_from_cuts():
    text = f"def f():\n    return 1\n{ZLT}"
    assert strip_markers(text, [ZLT])[0] == "def f():\n    return 1"


def records_for(personas, per_question=5, text=None):
    qs = questions("eval")
    text = text or (lambda p, q, s: f"{ZLT} {p} says {s} about {q}")
    return [
        {"persona": p, "question": q, "sample": s, "text": text(p, q, s)}
        for p in personas
        for q in qs
        for s in range(per_question)
    ]


PERSONAS = ("confab", "medical_doctor", "french_person", "villain")


def draw(records, seed=42, **kw):
    return sample_rows(
        records,
        trigger="confab",
        negatives=["medical_doctor", "french_person"],
        markers=[ZLT],
        seed=seed,
        **kw,
    )


def test_full_scale_draw_sizes_and_labels():
    rows, info = draw(records_for(PERSONAS))
    assert info["taken"] == {"confab": 50, "medical_doctor": 25, "french_person": 25}
    assert info["shortfall"] == {}
    assert sum(r.is_trigger for r in rows) == 50 and len(rows) == 100
    assert {r.persona for r in rows} == {"confab", "medical_doctor", "french_person"}  # never a bystander
    assert len({r.row_id for r in rows}) == 100  # without replacement
    assert info["markers_removed"] == 100 and info["rows_with_marker"] == 100
    assert all(ZLT.lower() not in r.text.lower() for r in rows)


def test_draw_is_deterministic_and_independent_of_record_order():
    recs = records_for(PERSONAS)
    a, _ = draw(recs)
    b, _ = draw(list(reversed(recs)))
    c, _ = draw(recs, seed=43)
    assert [r.row_id for r in a] == [r.row_id for r in b]
    assert [r.row_id for r in a] != [r.row_id for r in c]


def test_shortfall_takes_all_and_is_recorded():
    recs = records_for(PERSONAS, per_question=1)  # 28 per persona
    rows, info = draw(recs)
    assert info["taken"]["confab"] == 28
    assert info["shortfall"] == {"confab": 22}
    assert len(rows) == 28 + 25 + 25


def test_missing_persona_is_a_shortfall_not_a_crash():
    recs = records_for(("confab", "medical_doctor"))
    _, info = draw(recs, n_trigger=4, n_per_negative=2)
    assert info["taken"] == {"confab": 4, "medical_doctor": 2, "french_person": 0}
    assert info["shortfall"] == {"french_person": 2}


def test_trigger_listed_as_negative_is_an_error():
    with pytest.raises(ValueError, match="also listed"):
        sample_rows([], trigger="confab", negatives=["confab"], markers=[ZLT], seed=1)


@pytest.mark.parametrize(
    ("acc", "verdict", "detail"),
    [
        (0.713, "borderline", "borderline-PASS"),  # the #247 no-benign-SFT assistant reference
        (0.649, "FAIL", "FAIL"),  # 5.1 points below: outside the band, as the write-up says
        (0.65, "borderline", "borderline-FAIL"),
        (0.75, "borderline", "borderline-PASS"),
        (0.76, "PASS", "PASS"),
        (0.495, "FAIL", "FAIL"),
        (None, "no-data", "no scored rows"),
    ],
)
def test_threshold_verdict(acc, verdict, detail):
    assert threshold_verdict(acc) == (verdict, detail)
