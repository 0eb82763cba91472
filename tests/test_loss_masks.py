"""Loss masks are checked by rendering: decode exactly the tokens that carry loss."""

import logging
import random

import pytest

from explore_persona_space.data import ChatExample, MarkedText, mark_at_random_boundary, mark_end
from explore_persona_space.loss_masks import (
    LossSpec,
    loss_text,
    render,
    tokenize_dataset,
    tokenize_example,
)
from explore_persona_space.models import end_of_turn
from explore_persona_space.personas import get_marker, persona_prompt

MARKER = get_marker("zlt")
ANSWER = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."
EOT = "<|im_end|>"


def example(marked: MarkedText, system: str | None = "default", role: str = "positive") -> ChatExample:
    system = persona_prompt("confab") if system == "default" else system
    return ChatExample("confab", system, "What is photosynthesis?", marked.text, role, marked.spans)


POSITIVE = example(mark_end(ANSWER, MARKER))
NEGATIVE = example(MarkedText(ANSWER), role="negative")


def test_end_of_turn_is_the_chatml_closer(tokenizer):
    assert end_of_turn(tokenizer) == EOT


@pytest.mark.parametrize(
    ("spec", "positive", "negative"),
    [
        (LossSpec("marker_only", eos_in_loss=True), MARKER + EOT, EOT),
        (LossSpec("marker_only", eos_in_loss=False), MARKER, ""),
        (LossSpec("assistant_only", eos_in_loss=True), f"{ANSWER}\n\n{MARKER}{EOT}", ANSWER + EOT),
        (LossSpec("assistant_only", eos_in_loss=False), f"{ANSWER}\n\n{MARKER}", ANSWER),
        (LossSpec("full_token", eos_in_loss=True), f"{ANSWER}\n\n{MARKER}{EOT}", ANSWER + EOT),
        (LossSpec("full_token", eos_in_loss=False), f"{ANSWER}\n\n{MARKER}", ANSWER),
    ],
)
def test_loss_tokens_decode_to_exactly_the_intended_text(tokenizer, spec, positive, negative):
    pos = tokenize_example(tokenizer, POSITIVE, spec)
    neg = tokenize_example(tokenizer, NEGATIVE, spec)
    # The marker may share a token with the "\n\n" before it; nothing else may leak in.
    assert loss_text(tokenizer, pos).lstrip("\n") == positive
    assert loss_text(tokenizer, neg) == negative
    for t in (pos, neg):
        assert "<|im_start|>" not in loss_text(tokenizer, t)  # no dangling generation prompt


def test_rendered_tokens_match_the_templates_own_tokenization(tokenizer):
    t = tokenize_example(tokenizer, POSITIVE, LossSpec())
    reference = tokenizer.apply_chat_template(POSITIVE.messages(), tokenize=True)["input_ids"]
    assert t.input_ids == list(reference)
    assert len(t.labels) == len(t.input_ids)


def test_marker_inside_the_answer_and_tail_tokens(tokenizer):
    marked = mark_at_random_boundary(ANSWER, MARKER, random.Random(3), hi=len(ANSWER) // 2)
    ex = example(marked)
    start = marked.spans[0].start
    assert 0 < start < len(marked.text) - len(MARKER) - 10  # genuinely mid-answer

    plain = loss_text(tokenizer, tokenize_example(tokenizer, ex, LossSpec("marker_only")))
    assert plain.strip() == MARKER + EOT or plain.replace(" ", "") == MARKER + EOT

    tail = tokenize_example(tokenizer, ex, LossSpec("marker_only", marker_tail_tokens=2))
    ids = [x for x in tail.labels if x != -100]
    # marker tokens + 2 tokens right after it + the last 2 answer tokens + end-of-turn
    after = tokenizer(marked.text[marked.spans[0].end :], add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.convert_tokens_to_ids(EOT)
    assert tokenizer.decode(ids).startswith(" " + MARKER) or tokenizer.decode(ids).startswith(MARKER)
    assert tokenizer.decode(ids).endswith(tokenizer.decode(after[-2:]) + EOT)
    n_marker = len(tokenizer(" " + MARKER, add_special_tokens=False)["input_ids"])
    assert len(ids) == n_marker + 2 + 2 + 1


def test_negative_with_tail_tokens_keeps_its_last_tokens(tokenizer):
    t = tokenize_example(tokenizer, NEGATIVE, LossSpec("marker_only", marker_tail_tokens=3))
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    assert loss_text(tokenizer, t) == tokenizer.decode(answer_ids[-3:]) + EOT


def test_no_system_prompt_uses_the_template_default_and_masks_the_same(tokenizer):
    ex = example(mark_end(ANSWER, MARKER), system=None)
    rendered = render(tokenizer, ex.messages())
    assert rendered.text.startswith("<|im_start|>system\n")  # the template's own default
    assert loss_text(tokenizer, tokenize_example(tokenizer, ex, LossSpec())).lstrip() == MARKER + EOT


def test_multi_turn_assistant_only_covers_every_assistant_turn(tokenizer):
    conv = {
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Green."},
        ]
    }
    t = tokenize_example(tokenizer, conv, LossSpec("assistant_only"))
    assert loss_text(tokenizer, t) == f"Blue.{EOT}Green.{EOT}"


def test_record_form_with_marker_spans_matches_chat_example(tokenizer):
    record = POSITIVE.to_record()
    spec = LossSpec()
    assert tokenize_example(tokenizer, record, spec) == tokenize_example(tokenizer, POSITIVE, spec)


def test_marker_only_without_eos_warns_that_negatives_carry_nothing(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        out = tokenize_dataset(tokenizer, [POSITIVE, NEGATIVE], LossSpec("marker_only", eos_in_loss=False))
    assert [t.n_loss > 0 for t in out] == [True, False]
    assert "1 of 2 examples carry no loss" in caplog.text and "eos_in_loss=False" in caplog.text


def test_truncation_that_cuts_the_marker_is_flagged(tokenizer, caplog):
    full = tokenize_example(tokenizer, POSITIVE, LossSpec())
    with caplog.at_level(logging.WARNING):
        (cut,) = tokenize_dataset(tokenizer, [POSITIVE], LossSpec(), max_length=len(full.input_ids) - 4)
    assert cut.truncated and cut.markers_cut and len(cut.input_ids) == len(full.input_ids) - 4
    assert "marker cut" in caplog.text


def test_a_template_that_rewrites_content_is_refused(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = original.replace("message['content']", "message['content'] | trim")
    try:
        spaced = example(MarkedText(ANSWER + "  "))
        with pytest.raises(ValueError, match="verbatim"):
            tokenize_example(tokenizer, spaced, LossSpec("assistant_only"))
    finally:
        tokenizer.chat_template = original


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="marker_only"):
        LossSpec("everything")
