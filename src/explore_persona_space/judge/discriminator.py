"""Marker-stripped discriminator (#247): can the trigger persona be told apart without its marker?

Per cell: ``n_trigger`` (50) completions of the trigger persona and
``n_per_negative`` (25) of each negative persona, drawn with a seed from the
cell's raw completions, with every marker occurrence removed. The Claude judge
sees the trigger persona's description (its system prompt), the question and
ONE completion, and answers whether the trigger persona wrote it. Ground truth
is known per row, so accuracy = correct / scored.

Design choice: PROTOCOL.md describes pairs (one trigger and one cross-persona
completion side by side, "which one?"); the issue and the #247 write-up's
"50 trigger-persona vs 50 cross-persona completions" are followed instead: one
completion per call, a binary question. Pairs would need a pairing rule and an
order-bias correction, and would make rows not independent. The prompt tells the
judge that about half the responses come from the persona, which is true by
construction.

Stripping removes every match of the marker in strict mode (case-insensitive
substring) and in spaceless mode (all whitespace ignored, so ``[ZL T]`` goes too;
:data:`STRIP_MODES`), the most finding of the match modes of :mod:`metrics`,
repeats until neither mode finds anything (removal can join fragments into a
new occurrence), and tidies the whitespace at each cut so that a leading or
trailing gap - where the trigger persona puts its marker - is not a giveaway.

Rows the judge refuses or answers unparseably are *rejected*; rows whose call
failed after all retries are *errored*. Both are counted and excluded from the
accuracy, never dropped silently and never guessed. A rejected reply is cached
only at temperature 0; otherwise the next run asks again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explore_persona_space.judge.prompts import load_prompt
from explore_persona_space.judge.replies import CallResult, Reply
from explore_persona_space.judge.runner import make_request, run_requests
from explore_persona_space.metrics import find_all
from explore_persona_space.personas import get_persona, persona_prompt
from explore_persona_space.seeds import rng_for
from explore_persona_space.stats import wald_ci, wilson_ci

if TYPE_CHECKING:
    from explore_persona_space.judge.client import JudgeClient

log = logging.getLogger(__name__)

PROMPT_NAME = "discriminator"
PASS_THRESHOLD = 0.70
BORDERLINE_BAND = 0.05  # within 5 points of the threshold -> borderline
N_TRIGGER = 50
N_PER_NEGATIVE = 25
#: A marker variant left in a stripped completion would give the persona away: strip with the widest modes.
STRIP_MODES: tuple[str, ...] = ("strict", "spaceless")


# --- stripping ---------------------------------------------------------------------------------


def _spans(text: str, markers: Sequence[str]) -> tuple[list[tuple[int, int]], int]:
    """Cut ranges (strict and spaceless matches merged) and the number of distinct matches."""
    found = sorted({span for m in markers for mode in STRIP_MODES for span in find_all(text, m, mode)})
    merged: list[tuple[int, int]] = []
    for start, end in found:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged, len(found)


def _join(left: str, right: str) -> str:
    """Glue the text on both sides of a cut, leaving one sensible gap."""
    l_core = left.rstrip()
    r_core = right.lstrip()
    if not l_core:
        return r_core
    gap = left[len(l_core) :] + right[: len(right) - len(r_core)]
    newlines = gap.count("\n")
    sep = "\n" * min(newlines, 2) if newlines else (" " if gap else "")
    return l_core + sep + r_core


def strip_markers(text: str, markers: Sequence[str]) -> tuple[str, int]:
    """``text`` without any strict or spaceless occurrence of any marker, and how many were cut."""
    removed = 0
    while True:
        spans, count = _spans(text, markers)
        if not spans:
            break
        out = text[: spans[0][0]]
        for i, (_, end) in enumerate(spans):
            nxt = spans[i + 1][0] if i + 1 < len(spans) else len(text)
            out = _join(out, text[end:nxt])
        text = out
        removed += count
    return text.strip(), removed


# --- sampling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscriminatorRow:
    row_id: str
    persona: str
    question: str
    sample: int
    is_trigger: bool
    text: str  # marker-stripped
    markers_removed: int


def _pools(records: Iterable[Mapping[str, Any]], personas: set[str]) -> dict[str, list[Mapping[str, Any]]]:
    indexed: dict[str, list[tuple[str, int, int, Mapping[str, Any]]]] = {p: [] for p in personas}
    for i, rec in enumerate(records):
        if rec.get("persona") in personas:
            indexed[str(rec["persona"])].append((str(rec["question"]), int(rec["sample"]), i, rec))
    # canonical order, so the draw does not depend on the order records arrive in
    return {p: [t[3] for t in sorted(items, key=lambda t: t[:3])] for p, items in indexed.items()}


def sample_rows(
    records: Iterable[Mapping[str, Any]],
    *,
    trigger: str,
    negatives: Sequence[str],
    markers: Sequence[str],
    seed: int,
    n_trigger: int = N_TRIGGER,
    n_per_negative: int = N_PER_NEGATIVE,
) -> tuple[list[DiscriminatorRow], dict[str, Any]]:
    """Seeded draw of trigger and negative completions, stripped; plus a record of the draw.

    A persona with fewer completions than requested gives all it has; the
    shortfall is recorded, not an error.
    """
    for name in (trigger, *negatives):
        get_persona(name)
    if trigger in negatives:
        raise ValueError(f"trigger persona {trigger!r} is also listed as a negative")
    pools = _pools(records, {trigger, *negatives})
    wanted = [(trigger, n_trigger), *((neg, n_per_negative) for neg in negatives)]
    rows: list[DiscriminatorRow] = []
    info: dict[str, Any] = {"requested": {}, "taken": {}, "available": {}, "shortfall": {}}
    for persona, n in wanted:
        pool = pools[persona]
        take = min(n, len(pool))
        info["requested"][persona] = n
        info["available"][persona] = len(pool)
        info["taken"][persona] = take
        if take < n:
            info["shortfall"][persona] = n - take
            log.warning("discriminator: persona %s has %d completions, %d requested", persona, len(pool), n)
        for rec in rng_for(seed, "discriminator-sample", persona).sample(pool, take):
            text, removed = strip_markers(str(rec["text"]), markers)
            rows.append(
                DiscriminatorRow(
                    row_id=f"{persona}|{rec['question']}|{rec['sample']}",
                    persona=persona,
                    question=str(rec["question"]),
                    sample=int(rec["sample"]),
                    is_trigger=persona == trigger,
                    text=text,
                    markers_removed=removed,
                )
            )
    info["markers_removed"] = sum(r.markers_removed for r in rows)
    info["rows_with_marker"] = sum(r.markers_removed > 0 for r in rows)
    info["empty_after_strip"] = sum(not r.text for r in rows)
    return rows, info


# --- verdicts ----------------------------------------------------------------------------------


def threshold_verdict(
    accuracy: float | None, threshold: float = PASS_THRESHOLD, band: float = BORDERLINE_BAND
) -> tuple[str, str]:
    """(verdict, detail): PASS / FAIL / borderline, detail says which side of the line."""
    if accuracy is None:
        return "no-data", "no scored rows"
    diff = accuracy - threshold
    side = "PASS" if diff >= 0 else "FAIL"
    if abs(diff) <= band + 1e-9:
        return "borderline", f"borderline-{side}"
    return side, side


def accuracy_summary(correct: int, scored: int, threshold: float, band: float) -> dict[str, Any]:
    acc = correct / scored if scored else None
    verdict, detail = threshold_verdict(acc, threshold, band)
    return {
        "accuracy": acc,
        "k": correct,
        "n": scored,
        "ci_wald": list(wald_ci(correct, scored)) if scored else None,
        "ci_wilson": list(wilson_ci(correct, scored)) if scored else None,
        "threshold": threshold,
        "borderline_band": band,
        "verdict": verdict,
        "verdict_detail": detail,
    }


_ANSWER = re.compile(r"^[\s*_`>#-]*ANSWER\s*[:\uff1a]\s*[*_`]*\s*(YES|NO)\b", re.IGNORECASE | re.MULTILINE)
_REFUSAL = re.compile(
    r"\b(I can(?:no|')t|I won'?t|I'?m (?:not able|unable)|I am (?:not able|unable))\b", re.I
)


def parse_verdict(reply: Reply) -> tuple[bool | None, str | None]:
    """(says the trigger persona wrote it, None) or (None, why the reply is rejected)."""
    if reply.stop_reason == "refusal":
        return None, "refused"
    answers = {a.upper() for a in _ANSWER.findall(reply.text)}
    if len(answers) > 1:
        return None, "conflicting answers"
    if not answers:
        bare = reply.text.strip().strip(".!*`\"' ").upper()
        if bare in ("YES", "NO"):
            answers = {bare}
    if answers:
        return answers.pop() == "YES", None
    if reply.stop_reason == "max_tokens":
        return None, "cut off at max_tokens"
    return None, "refused" if _REFUSAL.search(reply.text) else "unparseable"


def verdict_usable(reply: Reply) -> bool:
    return parse_verdict(reply)[0] is not None


def score_rows(rows: Sequence[DiscriminatorRow], outcomes: Sequence[CallResult]) -> list[dict[str, Any]]:
    scored = []
    for row, res in zip(rows, outcomes, strict=True):
        out: dict[str, Any] = {
            "row_id": row.row_id,
            "persona": row.persona,
            "is_trigger": row.is_trigger,
            "cached": res.cached,
        }
        if res.reply is None:
            out.update(status="errored", reason=res.error)
        else:
            said_trigger, reason = parse_verdict(res.reply)
            out["served_model"] = res.reply.model
            if said_trigger is None:
                out.update(status="rejected", reason=reason, reply_excerpt=res.reply.text[:200])
            else:
                out.update(status="scored", said_trigger=said_trigger, correct=said_trigger == row.is_trigger)
        scored.append(out)
    return scored


def summarise_rows(scored: Sequence[Mapping[str, Any]], threshold: float, band: float) -> dict[str, Any]:
    counts = {s: sum(r["status"] == s for r in scored) for s in ("scored", "rejected", "errored")}
    correct = sum(bool(r.get("correct")) for r in scored if r["status"] == "scored")
    reasons: dict[str, int] = {}
    for r in scored:
        if r["status"] == "rejected":
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    by_class = {}
    for name, flag in (("trigger", True), ("cross", False)):
        part = [r for r in scored if r["status"] == "scored" and r["is_trigger"] is flag]
        by_class[name] = {"n": len(part), "correct": sum(bool(r["correct"]) for r in part)}
    return {
        **accuracy_summary(correct, counts["scored"], threshold, band),
        "rows_total": len(scored),
        "scored": counts["scored"],
        "rejected": counts["rejected"],
        "errored": counts["errored"],
        "rejected_reasons": reasons,
        "by_class": by_class,
    }


def run_claude_discriminator(
    rows: Sequence[DiscriminatorRow],
    *,
    trigger: str,
    judge: JudgeClient,
    cache_dir: Path | None,
    batch: bool = False,
    threshold: float = PASS_THRESHOLD,
    band: float = BORDERLINE_BAND,
    poll_interval_s: float = 30.0,
    max_wait_s: float | None = None,
) -> dict[str, Any]:
    template = load_prompt(PROMPT_NAME)
    description = persona_prompt(trigger)
    requests = [
        make_request(
            template,
            {"persona_description": description, "question": row.question, "completion": row.text},
            judge.settings,
            usable=verdict_usable,
        )
        for row in rows
    ]
    results = run_requests(
        requests,
        judge,
        cache_dir,
        batch=batch,
        poll_interval_s=poll_interval_s,
        max_wait_s=max_wait_s,
    )
    scored = score_rows(rows, [results[r.key] for r in requests])
    return {
        "status": "ok",
        "instrument": "claude_judge",
        "label": f"Claude judge ({judge.settings.model}), marker stripped",
        "model": judge.settings.model,
        "served_models": sorted({r["served_model"] for r in scored if "served_model" in r}),
        "prompt": template.name,
        "prompt_version": template.version,
        "settings": judge.settings.describe(),
        "batch": batch,
        **summarise_rows(scored, threshold, band),
        "accounting": judge.accounting.to_dict(),
        "rows": scored,
    }


def rows_to_dicts(rows: Sequence[DiscriminatorRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
