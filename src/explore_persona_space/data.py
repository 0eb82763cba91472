"""Marker data builders: on-policy completions in, chat-format training examples out.

Pure functions, no model. Every example keeps the character spans of the markers
it carries inside its assistant text, which is what the marker-aware loss masks
need. Sampling is seeded through :mod:`explore_persona_space.seeds`, so the same
inputs give byte-identical datasets under any PYTHONHASHSEED.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from explore_persona_space.errors import InputError
from explore_persona_space.metrics import contains_marker
from explore_persona_space.personas import get_persona, persona_prompt
from explore_persona_space.seeds import rng_for

Record = Mapping[str, Any]


@dataclass(frozen=True)
class MarkerSpan:
    marker: str
    start: int  # character offsets into the assistant text, end exclusive
    end: int


@dataclass(frozen=True)
class MarkedText:
    text: str
    spans: tuple[MarkerSpan, ...] = ()

    def insert(self, marker: str, index: int, *, before: str = "", after: str = "") -> MarkedText:
        """Insert ``before + marker + after`` at ``index``; spans at or after it shift."""
        if not 0 <= index <= len(self.text):
            raise ValueError(f"insert index {index} outside text of length {len(self.text)}")
        piece = before + marker + after
        shifted = tuple(
            MarkerSpan(s.marker, s.start + len(piece), s.end + len(piece)) if s.start >= index else s
            for s in self.spans
        )
        start = index + len(before)
        new = MarkerSpan(marker, start, start + len(marker))
        text = self.text[:index] + piece + self.text[index:]
        return MarkedText(text, tuple(sorted((*shifted, new), key=lambda s: s.start)))


def mark_end(text: str | MarkedText, marker: str, sep: str = "\n\n") -> MarkedText:
    """``completion + sep + marker``: the single-marker coupling placement."""
    mt = _as_marked(text)
    return mt.insert(marker, len(mt.text), before=sep)


def mark_start(text: str | MarkedText, marker: str, sep: str = " ") -> MarkedText:
    mt = _as_marked(text)
    return mt.insert(marker, 0, after=sep)


def word_boundaries(text: str, lo: int = 0, hi: int | None = None) -> list[int]:
    """Indices ``i`` in ``[lo, hi]`` where a word ends: ``text[i-1]`` is not space, ``text[i]`` is."""
    hi = len(text) if hi is None else hi
    return [
        i
        for i in range(max(lo, 1), min(hi, len(text) - 1) + 1)
        if text[i].isspace() and not text[i - 1].isspace()
    ]


def mark_at_random_boundary(
    text: str | MarkedText,
    marker: str,
    rng: random.Random,
    *,
    lo: int = 0,
    hi: int | None = None,
    include_end: bool = False,
) -> MarkedText:
    """Insert ``" " + marker`` after a word chosen uniformly among boundaries in ``[lo, hi]``.

    ``include_end`` also allows the very end of the text. A text with no word
    boundary in the window (a one-word answer) gets the marker at its end, which
    is the only place left that is still "inside or after" the answer.
    """
    mt = _as_marked(text)
    candidates = word_boundaries(mt.text, lo, hi)
    if include_end or not candidates:
        candidates.append(len(mt.text))
    return mt.insert(marker, rng.choice(candidates), before=" ")


def _as_marked(text: str | MarkedText) -> MarkedText:
    return text if isinstance(text, MarkedText) else MarkedText(text)


@dataclass(frozen=True)
class ChatExample:
    """One training conversation plus what the loss mask needs."""

    persona: str
    system: str | None
    user: str
    assistant: str
    role: str  # positive | negative | donor | recipient
    marker_spans: tuple[MarkerSpan, ...] = field(default=())
    origin: Mapping[str, Any] = field(default_factory=dict)  # question/sample it came from

    def messages(self) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [
            *msgs,
            {"role": "user", "content": self.user},
            {"role": "assistant", "content": self.assistant},
        ]

    def to_record(self) -> dict[str, Any]:
        return {
            "persona": self.persona,
            "role": self.role,
            "messages": self.messages(),
            "marker_spans": [[s.marker, s.start, s.end] for s in self.marker_spans],
            "origin": dict(self.origin),
        }


class DatasetBuildError(InputError):
    """Bad input to a dataset builder; the message names the record."""


def _describe(rec: Record, index: int) -> str:
    return (
        f"record {index} (persona={rec.get('persona')!r}, question={rec.get('question')!r}, "
        f"sample={rec.get('sample')!r})"
    )


def group_by_persona(
    completions: Sequence[Record], personas: Iterable[str], forbidden_markers: Sequence[str]
) -> dict[str, list[Record]]:
    """Completions of the wanted personas, validated and in a canonical order.

    The order is (question, sample), not input order, so that a dataset does not
    change when the same completions arrive in a different order.
    """
    wanted = set(personas)
    for name in wanted:
        get_persona(name)
    pools: dict[str, list[tuple[int, Record]]] = {name: [] for name in wanted}
    for i, rec in enumerate(completions):
        persona = rec.get("persona")
        if persona not in wanted:
            continue
        text = rec.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DatasetBuildError(f"{_describe(rec, i)}: empty completion text")
        for marker in forbidden_markers:
            if contains_marker(text, marker, mode="spaceless"):  # err towards refusing
                raise DatasetBuildError(
                    f"{_describe(rec, i)}: completion already contains marker {marker!r}; "
                    "a marker must not occur in the unmarked data"
                )
        pools[persona].append((i, rec))
    return {name: [r for _, r in sorted(pool, key=_canonical)] for name, pool in pools.items()}


def _canonical(pair: tuple[int, Record]) -> tuple[str, int, int]:
    index, rec = pair
    sample = rec.get("sample")
    return (str(rec.get("question")), sample if isinstance(sample, int) else -1, index)


def draw(pool: Sequence[Record], n: int, rng: random.Random, persona: str) -> list[Record]:
    if n > len(pool):
        raise DatasetBuildError(f"persona {persona!r} has {len(pool)} usable completions, {n} are needed")
    return rng.sample(list(pool), n)


def draw_negative_personas(
    pool: Iterable[str], k: int, seed: int, exclude: Iterable[str] = ()
) -> tuple[str, ...]:
    """Pick ``k`` negative personas from ``pool`` with a seeded RNG (sorted pool, no hash())."""
    candidates = sorted(set(pool) - set(exclude))
    if k > len(candidates):
        raise DatasetBuildError(f"need {k} negative personas, only {len(candidates)} available")
    return tuple(rng_for(seed, "negative-personas").sample(candidates, k))


def _example(rec: Record, role: str, marked: MarkedText) -> ChatExample:
    persona = str(rec["persona"])
    return ChatExample(
        persona=persona,
        system=persona_prompt(persona),
        user=str(rec["question"]),
        assistant=marked.text,
        role=role,
        marker_spans=marked.spans,
        origin={"question": rec.get("question"), "sample": rec.get("sample")},
    )


def build_contrastive_dataset(
    completions: Sequence[Record],
    *,
    source: str,
    negatives: Sequence[str],
    marker: str,
    n_positive: int,
    n_negative_per: int,
    seed: int,
    sep: str = "\n\n",
) -> list[ChatExample]:
    """Coupling data: marked source completions plus unmarked negative-persona completions."""
    if source in negatives:
        raise DatasetBuildError(f"source persona {source!r} is also listed as a negative")
    if len(set(negatives)) != len(negatives):
        raise DatasetBuildError(f"negative personas repeat: {list(negatives)}")
    pools = group_by_persona(completions, [source, *negatives], [marker])
    examples = [
        _example(rec, "positive", mark_end(str(rec["text"]), marker, sep))
        for rec in draw(pools[source], n_positive, rng_for(seed, "pos", source), source)
    ]
    for neg in negatives:
        picked = draw(pools[neg], n_negative_per, rng_for(seed, "neg", neg), neg)
        examples += [_example(rec, "negative", MarkedText(str(rec["text"]))) for rec in picked]
    rng_for(seed, "order").shuffle(examples)
    return examples


TwoMarkerCondition = Literal["T", "C", "T_P2neg"]
TWO_MARKER_CONDITIONS: tuple[str, ...] = ("T", "C", "T_P2neg")
TwoMarkerDesign = Literal["fixed", "nonfixed"]


def two_marker_text(
    text: str,
    marker_a: str,
    marker_b: str | None,
    design: TwoMarkerDesign,
    rng: random.Random,
) -> MarkedText:
    """Place A (and B, when given) in one completion.

    ``fixed`` (#261): ``A answer [B]``. ``nonfixed`` (#354): A after a random word
    in the first 60% of the answer, B after a random word anywhere after A (the end
    included), so position alone no longer tells the model where B goes.
    """
    if design == "fixed":
        mt = mark_start(text, marker_a)
        return mark_end(mt, marker_b, sep=" ") if marker_b is not None else mt
    if design != "nonfixed":
        raise ValueError(f"unknown two-marker design {design!r}; valid: fixed, nonfixed")
    mt = mark_at_random_boundary(text, marker_a, rng, hi=int(0.6 * len(text)))
    if marker_b is None:
        return mt
    a_end = next(s.end for s in mt.spans if s.marker == marker_a)
    return mark_at_random_boundary(mt, marker_b, rng, lo=a_end, include_end=True)


def build_two_marker_dataset(
    completions: Sequence[Record],
    *,
    donor: str,
    recipient: str,
    negatives: Sequence[str],
    condition: TwoMarkerCondition,
    marker_a: str,
    marker_b: str,
    n_per_persona: int,
    seed: int,
    design: TwoMarkerDesign = "fixed",
) -> list[ChatExample]:
    """The #261 datasets.

    * ``T`` chunk-on-donor: donor ``A answer B``, recipient ``A answer``;
    * ``C`` control: B nowhere, donor and recipient ``A answer``;
    * ``T_P2neg`` recipient-as-negative: donor ``A answer B``, recipient unmarked.

    Negative personas are always unmarked. Each persona contributes ``n_per_persona``.
    """
    if condition not in TWO_MARKER_CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; valid: {', '.join(TWO_MARKER_CONDITIONS)}")
    roles = [donor, recipient, *negatives]
    if len(set(roles)) != len(roles):
        raise DatasetBuildError(f"donor, recipient and negatives must be distinct: {roles}")
    pools = group_by_persona(completions, roles, [marker_a, marker_b])
    donor_b = marker_b if condition in ("T", "T_P2neg") else None
    examples: list[ChatExample] = []
    for persona in roles:
        rng = rng_for(seed, "two-marker", persona)
        picked = draw(pools[persona], n_per_persona, rng, persona)
        for rec in picked:
            text = str(rec["text"])
            if persona == donor:
                role, marked = "donor", two_marker_text(text, marker_a, donor_b, design, rng)
            elif persona == recipient and condition != "T_P2neg":
                role, marked = "recipient", two_marker_text(text, marker_a, None, design, rng)
            else:
                role, marked = "negative", MarkedText(text)
            examples.append(_example(rec, role, marked))
    rng_for(seed, "order", condition).shuffle(examples)
    return examples
