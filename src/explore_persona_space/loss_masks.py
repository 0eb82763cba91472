"""Which tokens of a rendered chat carry loss, for each loss mode of PROTOCOL.md.

The mask is built from character spans of the text the tokenizer's own chat
template renders, mapped to tokens through the fast tokenizer's offsets. TRL's
``assistant_only_loss`` would need ``{% generation %}`` tags that Qwen2.5's
template lacks, so we do not rely on it.

Modes:

* ``marker_only`` - an example with marker spans (a positive) carries loss on
  every token overlapping a marker, on the ``marker_tail_tokens`` assistant
  tokens after each marker, and on the end-of-turn token; an example without
  markers (a negative) carries loss on the end-of-turn token only, which is how
  it learns to stop where a positive would emit the marker. With
  ``marker_tail_tokens = K > 0`` every example also keeps the loss on its last K
  assistant tokens.
* ``assistant_only`` - every token of every assistant turn (standard SFT).
* ``full_token`` - the name the two-marker write-ups give the same
  assistant-completion mask; kept as its own mode so configs read like them.

``eos_in_loss`` switches the end-of-turn token of the assistant turns in or out
of every mode (the two-marker study found EOS-in-loss was the binding confound).
The newline the template writes after the end-of-turn token never carries loss:
generation stops at the end-of-turn token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from explore_persona_space.data import ChatExample
from explore_persona_space.models import end_of_turn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LossMode = Literal["marker_only", "assistant_only", "full_token"]
LOSS_MODES: tuple[str, ...] = ("marker_only", "assistant_only", "full_token")
IGNORE = -100
Span = tuple[int, int]


@dataclass(frozen=True)
class LossSpec:
    mode: LossMode = "marker_only"
    eos_in_loss: bool = True
    marker_tail_tokens: int = 0

    def __post_init__(self) -> None:
        if self.mode not in LOSS_MODES:
            raise ValueError(f"unknown loss mode {self.mode!r}; choose one of {', '.join(LOSS_MODES)}")
        if self.marker_tail_tokens < 0:
            raise ValueError("marker_tail_tokens must be >= 0")


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    markers_cut: bool = False  # a marker token fell beyond max_length

    @property
    def n_loss(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass(frozen=True)
class Rendered:
    """A chat rendered by its template, with the character spans the masks need."""

    text: str
    assistant: tuple[Span, ...]  # content of each assistant turn
    end_of_turn: tuple[Span, ...]  # the end-of-turn token closing each assistant turn
    markers: tuple[Span, ...]  # markers, in rendered-text coordinates


def _as_parts(example: ChatExample | Mapping[str, Any]) -> tuple[list[dict[str, str]], list[Span]]:
    """Messages and marker spans (relative to the last assistant turn) of either input form."""
    if isinstance(example, ChatExample):
        return example.messages(), [(s.start, s.end) for s in example.marker_spans]
    messages = list(example["messages"])
    spans = [(int(s[-2]), int(s[-1])) for s in example.get("marker_spans", ())]
    return messages, spans


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], eot: str | None = None
) -> Rendered:
    """Render a chat and locate each assistant turn by rendering its prefix with a generation prompt."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    eot = eot or end_of_turn(tokenizer)
    assistant, eots = [], []
    for j, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(list(messages[:j]), tokenize=False, add_generation_prompt=True)
        start, end = len(prefix), len(prefix) + len(msg["content"])
        if not text.startswith(prefix) or text[start:end] != msg["content"]:
            raise ValueError(
                f"the chat template does not render assistant turn {j} verbatim after its generation "
                "prompt; loss masks cannot be placed for this template"
            )
        if not text.startswith(eot, end):
            raise ValueError(f"assistant turn {j} is not closed by the end-of-turn token {eot!r}")
        assistant.append((start, end))
        eots.append((end, end + len(eot)))
    if not assistant:
        raise ValueError("the conversation has no assistant turn to train on")
    return Rendered(text, tuple(assistant), tuple(eots), ())


def _overlapping(offsets: Sequence[Span], spans: Sequence[Span]) -> set[int]:
    hit = set()
    for i, (a, b) in enumerate(offsets):
        if b > a and any(a < e and b > s for s, e in spans):
            hit.add(i)
    return hit


def loss_token_indices(offsets: Sequence[Span], rendered: Rendered, spec: LossSpec) -> set[int]:
    """Indices of the tokens that carry loss under ``spec``."""
    content = _overlapping(offsets, rendered.assistant)
    picked: set[int] = set()
    if spec.mode == "marker_only":
        picked |= _overlapping(offsets, rendered.markers)
        k = spec.marker_tail_tokens
        if k:
            for _, m_end in rendered.markers:
                after = sorted(i for i in content if offsets[i][0] >= m_end)
                picked.update(after[:k])
            last_turn = _overlapping(offsets, rendered.assistant[-1:])
            picked.update(sorted(last_turn)[-k:])
    else:
        picked |= content
    if spec.eos_in_loss:
        picked |= _overlapping(offsets, rendered.end_of_turn)
    return picked


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    example: ChatExample | Mapping[str, Any],
    spec: LossSpec,
    max_length: int | None = None,
    eot: str | None = None,
) -> TokenizedExample:
    """Token ids and labels (-100 where no loss) for one conversation."""
    messages, marker_spans = _as_parts(example)
    rendered = render(tokenizer, messages, eot)
    base = rendered.assistant[-1][0]
    markers = tuple((base + s, base + e) for s, e in marker_spans)
    rendered = Rendered(rendered.text, rendered.assistant, rendered.end_of_turn, markers)
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    picked = loss_token_indices(offsets, rendered, spec)
    marker_tokens = _overlapping(offsets, markers)
    if spec.mode == "marker_only" and markers and not marker_tokens:
        raise ValueError("marker spans cover no token; are they relative to the last assistant turn?")
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, offsets = ids[:max_length], offsets[:max_length]
    labels = [tok if i in picked else IGNORE for i, tok in enumerate(ids)]
    markers_cut = truncated and any(i >= len(ids) for i in marker_tokens)
    return TokenizedExample(ids, labels, truncated, markers_cut)


def tokenize_dataset(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ChatExample | Mapping[str, Any]],
    spec: LossSpec,
    max_length: int | None = None,
) -> list[TokenizedExample]:
    """Tokenize every example and warn, with counts, about examples that lose their signal."""
    eot = end_of_turn(tokenizer)  # found once, not once per example
    out = [tokenize_example(tokenizer, ex, spec, max_length, eot) for ex in examples]
    empty = sum(1 for t in out if t.n_loss == 0)
    if empty:
        hint = (
            " (marker_only with eos_in_loss=False gives negatives no loss at all)"
            if spec.mode == "marker_only" and not spec.eos_in_loss
            else ""
        )
        log.warning("%d of %d examples carry no loss%s", empty, len(out), hint)
    cut = {"truncated": sum(t.truncated for t in out), "marker cut": sum(t.markers_cut for t in out)}
    for what, n in cut.items():
        if n:
            log.warning("%d of %d examples %s at max_length=%s", n, len(out), what, max_length)
    return out


def loss_text(tokenizer: PreTrainedTokenizerBase, tokenized: TokenizedExample) -> str:
    """Decode exactly the tokens that carry loss (for inspection and tests)."""
    return tokenizer.decode([x for x in tokenized.labels if x != IGNORE])
