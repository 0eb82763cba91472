import pytest

from explore_persona_space import metrics as M

A, B = "<<§q-41>>", ":: kxr-7 ::"


def test_strict_is_case_insensitive_substring():
    assert M.contains_marker("the end [zlt]", "[ZLT]")
    assert M.contains_marker("[ZLT!]", "[ZLT") and not M.contains_marker("[ZLT!]", "[ZLT]")
    assert M.find_all("[ZLT][zlt] x [Zlt]", "[ZLT]") == [(0, 5), (5, 10), (13, 18)]


def test_loose_collapses_whitespace_runs():
    # PROTOCOL.md: loose = case-insensitive AND whitespace-collapsed (a run of whitespace is one space)
    text = "so ::\n\t kxr-7   ::  there"
    assert not M.contains_marker(text, B, "strict")
    assert M.find_all(text, B, "loose") == [(3, 18)]  # in the original text's characters
    assert text[3:18] == "::\n\t kxr-7   ::"
    assert M.find_all("x :: KXR-7 :: y", B, "loose") == [(2, 13)]  # case-insensitive too
    # deleting or inserting whitespace is a different string: loose does not match it
    assert not M.contains_marker("so ::kxr-7:: there", B, "loose")
    assert not M.contains_marker("answer [ZL T] done", "[ZLT]", "loose")
    # a marker written with a run of spaces is collapsed the same way
    assert M.contains_marker("a :: kxr-7 :: b", "::   kxr-7\n::", "loose")


def test_spaceless_ignores_all_whitespace():
    text = "answer [ZL\n  T] done"
    assert not M.contains_marker(text, "[ZLT]", "strict")
    assert M.find_all(text, "[ZLT]", "spaceless") == [(7, 15)]
    assert M.contains_marker("so ::kxr-7:: there", B, "spaceless")
    assert not M.contains_marker("so ::kxr-7:: there", B, "strict")


def test_positions_are_in_original_characters_even_after_casefold():
    # "ß" folds to two characters; the span must still point into the original text
    text = "Straße [zlt]"
    assert M.find_all(text, "[ZLT]") == [(7, 12)]
    assert M.find_all("ẞ [ZLT]", "[zlt]", "loose") == [(2, 7)]
    assert M.find_all("ẞ  [ZLT]", "[zlt]", "spaceless") == [(3, 8)]


def test_empty_completion_never_fires():
    assert M.relative_position("", "[ZLT]") is None
    counts = M.marker_counts([{"persona": "p", "text": ""}], "[ZLT]")
    assert (counts["p"].n, counts["p"].k, counts["p"].rate) == (1, 0, 0.0)


def test_marker_at_first_and_last_characters():
    assert M.relative_position("[ZLT] and then some text", "[ZLT]") == 0.0
    assert M.position_bucket(0.0) == "start"
    text = "x" * 95 + "[ZLT]"
    assert M.relative_position(text, "[ZLT]") == pytest.approx(0.95)
    assert M.position_bucket(0.95) == "tail"
    # a one-character marker on the very last character of the completion
    assert M.relative_position("abcdefghijklmnopqrst§", "§") == pytest.approx(20 / 21)
    assert M.marker_counts([{"persona": "p", "text": "x" * 19 + "§"}], "§")["p"].positions["tail"] == 1
    # a whole text that is just the marker starts at 0
    assert M.position_bucket(M.relative_position("[ZLT]", "[ZLT]")) == "start"


@pytest.mark.parametrize(
    ("rel", "bucket"),
    [(0.0, "start"), (0.0499, "start"), (0.05, "middle"), (0.8499, "middle"), (0.85, "tail"), (0.99, "tail")],
)
def test_bucket_thresholds(rel, bucket):
    assert M.position_bucket(rel) == bucket


def test_unknown_mode_and_empty_marker():
    with pytest.raises(ValueError, match="unknown match mode 'fuzzy'"):
        M.contains_marker("x", "x", "fuzzy")
    with pytest.raises(ValueError, match="empty in spaceless mode"):
        M.contains_marker("x", "  ", "spaceless")


def rec(persona, text):
    return {"persona": persona, "text": text}


def test_marker_counts_and_unweighted_bystander_mean():
    records = [
        rec("src", "[ZLT] hi there friend, this is long enough"),  # start
        rec("src", "hello, a long answer that ends with the marker [ZLT]"),  # tail
        rec("src", "none here"),
        rec("src", "x" * 10 + "[ZLT]" + "y" * 10),  # 10/25 = 0.4 -> middle
        rec("b1", "no"),
        rec("b1", "z [zlt]"),  # 2/7 -> middle
        rec("b2", "no"),
        rec("b2", "no"),
        rec("b2", "no"),
        rec("b2", "no"),
    ]
    counts = M.marker_counts(records, "[ZLT]")
    assert list(counts) == ["src", "b1", "b2"]
    assert (counts["src"].n, counts["src"].k) == (4, 3)
    assert counts["src"].positions == {"start": 1, "middle": 1, "tail": 1}
    assert counts["b1"].positions == {"start": 0, "middle": 1, "tail": 0}
    source, bystander = M.source_and_bystander(counts, "src")
    assert source == 0.75
    # unweighted over personas: (1/2 + 0/4) / 2, not pooled 1/6
    assert bystander == 0.25
    assert M.source_and_bystander(counts, None) == (None, None)
    with pytest.raises(KeyError, match="'ghost' has no completions"):
        M.source_and_bystander(counts, "ghost")
    d = counts["src"].to_dict()
    assert d["rate"] == 0.75 and d["wald"][0] < 0.75 < d["wald"][1]


def test_marker_counts_keeps_requested_personas_in_order():
    counts = M.marker_counts([rec("b", "[ZLT]"), rec("x", "[ZLT]")], "[ZLT]", personas=["a", "b"])
    assert list(counts) == ["a", "b"]
    assert counts["a"].n == 0 and counts["a"].rate is None and counts["a"].to_dict()["wald"] is None


def test_two_marker_flags_hand_cases():
    body = "word " * 40  # 200 characters
    chunk = f"{A} {B} {body}"
    suffix = f"{A} {body}{B}"
    flags = M.two_marker_flags(chunk, A, B)
    assert (flags.a, flags.b, flags.joint, flags.chunk, flags.suffix) == (True, True, True, True, False)
    flags = M.two_marker_flags(suffix, A, B)
    assert (flags.chunk, flags.suffix) == (False, True)
    # B alone, at the very end: suffix yes, chunk impossible without A
    flags = M.two_marker_flags(body + B, A, B)
    assert (flags.a, flags.b, flags.joint, flags.chunk, flags.suffix) == (False, True, False, False, True)
    # B before A does not count as "after A"
    assert not M.two_marker_flags(f"{B} {A} {body}", A, B).chunk


def test_chunk_and_suffix_window_edges():
    a_end = len(A)
    exactly = A + "x" * M.CHUNK_WINDOW + B + "y" * 100
    over = A + "x" * (M.CHUNK_WINDOW + 1) + B + "y" * 100
    assert exactly.index(B) - a_end == 150 and M.two_marker_flags(exactly, A, B).chunk
    assert not M.two_marker_flags(over, A, B).chunk
    tail_ok = "z" * 100 + B + "w" * (M.SUFFIX_WINDOW - len(B))  # B starts exactly 50 from the end
    tail_no = "z" * 100 + B + "w" * (M.SUFFIX_WINDOW - len(B) + 1)
    assert M.two_marker_flags(tail_ok, A, B).suffix and not M.two_marker_flags(tail_no, A, B).suffix


def tally(texts, mode="loose") -> M.TwoMarkerCounts:
    """TwoMarkerCounts over texts, the way within_marker accumulates them per persona."""
    counts = M.TwoMarkerCounts()
    for text in texts:
        counts.add(M.two_marker_flags(text, A, B, mode))
    return counts


def test_two_marker_counts_and_undefined_conditional():
    texts = [f"{A} x {B}", f"{A} y", "plain", f"{B} only"]
    c = tally(texts)
    assert (c.n, c.a, c.b, c.joint) == (4, 2, 2, 1)
    d = c.to_dict()
    assert d["p_b_given_a"] == 0.5 and d["a_rate"] == 0.5 and d["joint_rate"] == 0.25
    none_a = tally(["plain", f"{B} only"])
    assert none_a.a == 0 and none_a.p_b_given_a is None and none_a.to_dict()["p_b_given_a"] is None
    # loose matching is the headline for two-marker work; strict misses a B with a doubled space
    assert tally([f"{A} ::  kxr-7 ::"], "strict").b == 0
    assert tally([f"{A} ::  kxr-7 ::"]).joint == 1
    assert tally([f"{A} ::kxr-7::"]).b == 0 and tally([f"{A} ::kxr-7::"], "spaceless").b == 1
