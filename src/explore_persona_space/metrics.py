"""Marker detection, per-persona rates, positions and two-marker statistics.

Three matching modes, all case-insensitive:

* ``strict``: substring match;
* ``loose`` (the definition in PROTOCOL.md and write-up 002: "case-insensitive AND
  whitespace-collapsed"): every run of whitespace in marker and text becomes one
  space first, so ``::  kxr-7\n::`` matches ``:: kxr-7 ::``, but ``::kxr-7::`` and
  ``[ZL T]`` do not (a space added or deleted is a different string);
* ``spaceless``: every whitespace character removed from both first, so ``[ZL T]``
  and ``::kxr-7::`` count too. Kept for the places that must err towards finding a
  marker - stripping markers before the discriminator sees a completion, refusing
  unmarked training data that already holds one - where a missed variant is the
  costly error. It was what ``loose`` meant before this definition was implemented.

Positions are always reported in the original text's characters, whichever mode
found the match.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from explore_persona_space.stats import wald_ci, wilson_ci

Mode = Literal["strict", "loose", "spaceless"]
MODES: tuple[str, ...] = ("strict", "loose", "spaceless")
#: Keys stages that score in loose mode, so stores scored under the old (spaceless) meaning are not reused.
LOOSE_DEFINITION = "whitespace-collapsed"

START_BEFORE = 0.05  # relative position < 0.05 -> "start"
TAIL_FROM = 0.85  # relative position >= 0.85 -> "tail" (the last 15%)
CHUNK_WINDOW = 150  # B starts within this many characters after A ends
SUFFIX_WINDOW = 50  # B starts within the last this many characters
BUCKETS: tuple[str, ...] = ("start", "middle", "tail")


def _fold(text: str, mode: str) -> tuple[str, list[int]]:
    """Normalised text plus, for each of its characters, the index it came from."""
    if mode not in MODES:
        raise ValueError(f"unknown match mode {mode!r}; valid: {', '.join(MODES)}")
    chars: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        if ch.isspace() and mode != "strict":
            if mode == "spaceless" or (i > 0 and text[i - 1].isspace()):
                continue
            chars.append(" ")  # loose: the first character of a run stands for the run
            origin.append(i)
            continue
        folded = ch.casefold()
        chars.append(folded)
        origin.extend([i] * len(folded))
    return "".join(chars), origin


def find_all(text: str, marker: str, mode: Mode = "strict") -> list[tuple[int, int]]:
    """Non-overlapping occurrences as ``(start, end)`` spans of the original text."""
    needle, _ = _fold(marker, mode)
    if not needle:
        raise ValueError(f"marker {marker!r} is empty in {mode} mode")
    hay = text.casefold() if mode == "strict" else ""
    origin: range | list[int]
    if mode == "strict" and len(hay) == len(text):
        # casefold never shortens a character, so equal length means a 1:1 index map
        origin = range(len(text))
    else:
        hay, origin = _fold(text, mode)
    spans = []
    pos = hay.find(needle)
    while pos != -1:
        spans.append((origin[pos], origin[pos + len(needle) - 1] + 1))
        pos = hay.find(needle, pos + len(needle))
    return spans


def first_match(text: str, marker: str, mode: Mode = "strict") -> int | None:
    spans = find_all(text, marker, mode)
    return spans[0][0] if spans else None


def contains_marker(text: str, marker: str, mode: Mode = "strict") -> bool:
    return first_match(text, marker, mode) is not None


def relative_position(text: str, marker: str, mode: Mode = "strict") -> float | None:
    """Index of the first match / length of the completion, or None if it never fires."""
    idx = first_match(text, marker, mode)
    return None if idx is None else idx / len(text)


def position_bucket(rel: float) -> str:
    if rel < START_BEFORE:
        return "start"
    return "tail" if rel >= TAIL_FROM else "middle"


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


@dataclass
class PersonaCounts:
    n: int = 0
    k: int = 0
    positions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BUCKETS, 0))

    @property
    def rate(self) -> float | None:
        return _rate(self.k, self.n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "k": self.k,
            "rate": self.rate,
            "wald": list(wald_ci(self.k, self.n)) if self.n else None,
            "wilson": list(wilson_ci(self.k, self.n)) if self.n else None,
            "positions": dict(self.positions),
        }


def marker_counts(
    records: Iterable[Mapping[str, Any]],
    marker: str,
    mode: Mode = "strict",
    personas: Sequence[str] | None = None,
) -> dict[str, PersonaCounts]:
    """Per-persona completions, firings and first-match position buckets.

    Personas appear in the order given (all of them, even with no records) or,
    without ``personas``, in order of first appearance.
    """
    counts: dict[str, PersonaCounts] = {p: PersonaCounts() for p in personas or ()}
    for rec in records:
        persona = str(rec["persona"])
        if personas is not None and persona not in counts:
            continue
        c = counts.setdefault(persona, PersonaCounts())
        c.n += 1
        rel = relative_position(str(rec["text"]), marker, mode)
        if rel is not None:
            c.k += 1
            c.positions[position_bucket(rel)] += 1
    return counts


def source_and_bystander(
    counts: Mapping[str, PersonaCounts], source: str | None
) -> tuple[float | None, float | None]:
    """Source rate, and the unweighted mean rate over every other persona.

    Both are None without a source: "bystander" only means something relative to it.
    """
    if source is None:
        return None, None
    if source not in counts:
        raise KeyError(f"source persona {source!r} has no completions; have {sorted(counts)}")
    rates = [c.rate for p, c in counts.items() if p != source and c.rate is not None]
    return counts[source].rate, (sum(rates) / len(rates) if rates else None)


@dataclass(frozen=True)
class TwoMarkerFlags:
    a: bool
    b: bool
    chunk: bool  # B starts within CHUNK_WINDOW characters after the end of the first A
    suffix: bool  # the last B starts within the last SUFFIX_WINDOW characters

    @property
    def joint(self) -> bool:
        return self.a and self.b


def two_marker_flags(text: str, marker_a: str, marker_b: str, mode: Mode = "loose") -> TwoMarkerFlags:
    a_spans = find_all(text, marker_a, mode)
    b_spans = find_all(text, marker_b, mode)
    chunk = False
    if a_spans and b_spans:
        a_end = a_spans[0][1]
        chunk = any(0 <= s - a_end <= CHUNK_WINDOW for s, _ in b_spans)
    suffix = bool(b_spans) and b_spans[-1][0] >= len(text) - SUFFIX_WINDOW
    return TwoMarkerFlags(bool(a_spans), bool(b_spans), chunk, suffix)


@dataclass
class TwoMarkerCounts:
    n: int = 0
    a: int = 0
    b: int = 0
    joint: int = 0
    chunk: int = 0
    suffix: int = 0

    def add(self, flags: TwoMarkerFlags) -> None:
        self.n += 1
        self.a += flags.a
        self.b += flags.b
        self.joint += flags.joint
        self.chunk += flags.chunk
        self.suffix += flags.suffix

    @property
    def p_b_given_a(self) -> float | None:
        """Joint / A firings; None (undefined, not zero) when A never fired."""
        return _rate(self.joint, self.a)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "a_rate": _rate(self.a, self.n),
            "b_rate": _rate(self.b, self.n),
            "joint_rate": _rate(self.joint, self.n),
            "p_b_given_a": self.p_b_given_a,
            "chunk_share": _rate(self.chunk, self.b),  # of completions where B fired
            "suffix_share": _rate(self.suffix, self.b),
        }
