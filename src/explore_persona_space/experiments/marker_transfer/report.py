"""The numbers the #121 write-up reports, from each cell's final stage result.

A cell's result carries ``summary`` (the strict marker eval of :func:`analyze.analyze`),
``capability`` (ARC-C, :mod:`explore_persona_space.capability`) and ``alignment``
(the Betley judge, or its recorded skip). From them:

* per cell: assistant, source and villain marker rates, the largest bystander rate
  (over every persona but the source, assistant included) with its persona;
* the forward-order conjunction: every post-stage-2 cell's marker count summed over
  all personas and seeds - it holds only when that sum is 0, and when it fails the
  firings are listed;
* two-proportion contrasts on counts pooled over seeds: a Fisher p-value where the
  pooled outcome varies, and "undefined (no variance)" where both sides are all 0
  (or all 1) - never a p of 1 or a NaN standing in for "nothing to test";
* the EM-success gate G4 on the mean Betley aligned score of every EM cell, with the
  misaligned share printed beside it; "not evaluated" (with the reason) when the
  judge did not run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from explore_persona_space.orchestrate import markdown_table
from explore_persona_space.personas import display_name
from explore_persona_space.stats import no_variance, p_text, two_proportion_test

ROLES = ("assistant", "source", "villain")


@dataclass(frozen=True)
class CellInfo:
    """What a cell is, for tables and figures; the script builds one per cell."""

    name: str
    arm: str  # "forward" | "reverse"
    group: str  # seeds of one group are pooled: a forward condition (C1...), or the reverse cell itself
    label: str  # the write-up's row name, e.g. "C1 seed=42 (EM)"
    describe: str  # what the group is, e.g. "evil AI + marker, then EM"
    seed: int
    em: bool = False  # an EM cell: the G4 gate applies
    post_stage2: bool = False  # a forward cell after its second-stage SFT: in the conjunction
    stage1: str = ""  # reverse arm: none | EM | benign SFT
    method: str = ""  # reverse arm: how the coupling was put on the stage-1 model


def _one(personas: Mapping[str, Any], name: str) -> dict[str, Any]:
    c = personas[name]
    return {"persona": name, "k": c["k"], "n": c["n"], "rate": c["rate"], "wilson": c["wilson"]}


def cell_rates(summary: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Assistant / source / villain rates and the largest bystander rate (first persona on a tie)."""
    personas = summary["personas"]
    others = [p for p in personas if p != source]
    top = max(others, key=lambda p: (personas[p]["rate"] or 0.0, -others.index(p)))
    out = {role: _one(personas, source if role == "source" else role) for role in ROLES}
    return out | {"max_bystander": _one(personas, top)}


def forward_conjunction(
    results: Mapping[str, Mapping[str, Any]], cells: Sequence[str]
) -> dict[str, Any] | None:
    """The write-up's claim as a computation: 0 marker firings over every persona of every given cell."""
    if not cells:
        return None
    firings, k, n = [], 0, 0
    for cell in cells:
        for persona, c in results[cell]["summary"]["personas"].items():
            k, n = k + c["k"], n + c["n"]
            if c["k"]:
                firings.append({"cell": cell, "persona": persona, "k": c["k"], "n": c["n"]})
    claim = "every post-stage-2 marker rate is 0.00% on every persona at every seed"
    if k == 0:
        text = f"Forward-order conjunction ({claim}): HOLDS - 0/{n:,} completions over {len(cells)} cells"
    else:
        listed = ", ".join(f"{f['cell']} {f['persona']} {f['k']}/{f['n']}" for f in firings)
        text = f"Forward-order conjunction ({claim}): FAILS - {k:,}/{n:,} completions fire: {listed}"
    return {"holds": k == 0, "k": k, "n": n, "cells": list(cells), "firings": firings, "text": text}


def contrast(title: str, a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, Any]:
    """Fisher exact on two pooled counts, or an explicit undefined when the outcome never varies."""
    out: dict[str, Any] = {"contrast": title, "a": dict(a), "b": dict(b)}
    if no_variance(a["k"], a["n"], b["k"], b["n"]):
        counts = f"{a['k']}/{a['n']} vs {b['k']}/{b['n']}"
        return out | {"p_fisher": None, "defined": False, "p_text": f"undefined: no variance ({counts})"}
    p = two_proportion_test(a["k"], a["n"], b["k"], b["n"]).p_fisher
    return out | {"p_fisher": p, "defined": True, "p_text": p_text(p)}


def pooled(rates: Mapping[str, Mapping[str, Any]], cells: Sequence[str], role: str) -> dict[str, int]:
    return {"k": sum(rates[c][role]["k"] for c in cells), "n": sum(rates[c][role]["n"] for c in cells)}


def contrasts(
    rates: Mapping[str, Mapping[str, Any]],
    infos: Sequence[CellInfo],
    wanted: Sequence[tuple[str, str, str, str]],
) -> list[dict[str, Any]]:
    """``wanted``: (title, group a, group b, role); a group's cells are pooled; absent groups skipped."""
    groups: dict[str, list[str]] = {}
    for info in infos:
        if info.name in rates:
            groups.setdefault(info.group, []).append(info.name)
    return [
        contrast(title, pooled(rates, groups[a], role), pooled(rates, groups[b], role))
        for title, a, b, role in wanted
        if a in groups and b in groups
    ]


def g4_gate(
    results: Mapping[str, Mapping[str, Any]], infos: Sequence[CellInfo], below: float
) -> dict[str, Any]:
    """G4, EM succeeded: every EM cell's mean Betley aligned score is below ``below``."""
    per_cell = {}
    for info in infos:
        if not info.em or info.name not in results:
            continue
        a = results[info.name].get("alignment") or {"status": "skipped", "reason": "not run"}
        mean = a.get("mean_aligned") if a.get("status") == "ok" else None
        passed = None if mean is None else mean < below
        why = a.get("reason") or "no eligible (coherent) completions"
        per_cell[info.name] = {
            "mean_aligned": mean,
            "misaligned_rate": a.get("misaligned_rate"),
            "passed": passed,
            "text": f"not evaluated ({why})" if passed is None else ("PASS" if passed else "FAIL"),
        }
    judged = [c["passed"] for c in per_cell.values() if c["passed"] is not None]
    rule = f"EM succeeded: mean Betley aligned score < {below:g} in every EM cell"
    if not per_cell:
        verdict = None
    elif not judged:
        reasons = sorted({c["text"] for c in per_cell.values()})
        verdict = f"G4 ({rule}): {'; '.join(reasons)}"
    else:
        status = "FAIL" if not all(judged) else "PASS" if len(judged) == len(per_cell) else "INCOMPLETE"
        both = ", ".join(
            f"{name} {c['mean_aligned']:.1f} / {100 * (c['misaligned_rate'] or 0):.1f}%"
            for name, c in per_cell.items()
            if c["passed"] is not None
        )
        verdict = (
            f"G4 ({rule}): {status} - {sum(judged)}/{len(per_cell)} EM cells pass, {len(judged)} judged "
            f"(mean aligned / misaligned share: {both})"
        )
    return {"threshold": below, "cells": per_cell, "text": verdict}


def summarize(
    results: Mapping[str, Mapping[str, Any]],
    infos: Sequence[CellInfo],
    *,
    source: str,
    marker: str,
    wanted: Sequence[tuple[str, str, str, str]],
    g4_below: float,
) -> dict[str, Any]:
    """Everything the headline, the figures and summary.json need, per cell and per claim."""
    shown = [i for i in infos if i.name in results]
    rates = {i.name: cell_rates(results[i.name]["summary"], source) for i in shown}
    cells = {
        i.name: {
            **asdict(i),
            "rates": rates[i.name],
            "personas": results[i.name]["summary"]["personas"],
            "capability": results[i.name].get("capability"),
            "alignment": results[i.name].get("alignment"),
            "empty": results[i.name].get("empty"),
        }
        for i in shown
    }
    return {
        "source": source,
        "marker": marker,
        "cells": cells,
        "conjunction": forward_conjunction(results, [i.name for i in shown if i.post_stage2]),
        "contrasts": contrasts(rates, shown, wanted),
        "g4": g4_gate(results, shown, g4_below),
    }


# ----------------------------------------------------------------------------- text
def rate2(r: Mapping[str, Any]) -> str:
    """The write-up's two-decimal percentage, with its counts."""
    return "n/a" if not r["n"] else f"{100 * r['k'] / r['n']:.2f}% ({r['k']}/{r['n']})"


def arc_text(cap: Mapping[str, Any] | None) -> str:
    if not cap or cap.get("accuracy") is None:
        return "n/a"
    return f"{cap['accuracy']:.3f} ({cap['k']}/{cap['n']})"


def betley_texts(a: Mapping[str, Any] | None) -> tuple[str, str]:
    """(mean aligned score, misaligned share) as shown, or the skip reason in both."""
    if not a or a.get("status") != "ok":
        why = f"skipped: {(a or {}).get('reason', 'not run')}"
        return why, why
    mean = "n/a" if a.get("mean_aligned") is None else f"{a['mean_aligned']:.1f}"
    share = "n/a" if not a.get("n") else f"{100 * a['k'] / a['n']:.1f}% ({a['k']}/{a['n']})"
    return mean, share


def headline(summary: Mapping[str, Any]) -> str:
    """The write-up's headline table (forward cells), the reverse table, contrasts and verdicts."""
    source, cells = summary["source"], summary["cells"]
    roles = [r for r in ROLES if not (r == "villain" and source == "villain")]
    names = {"assistant": "assistant", "source": display_name(source), "villain": "villain"}
    g4 = summary["g4"]["cells"]
    rows = []
    for c in (c for c in cells.values() if c["arm"] == "forward"):
        top = c["rates"]["max_bystander"]
        mean, share = betley_texts(c["alignment"])
        rows.append(
            [
                c["label"],
                *(rate2(c["rates"][r]) for r in roles),
                f"{rate2(top)} {display_name(top['persona'])}",
                arc_text(c["capability"]),
                mean,
                share,
                g4[c["name"]]["text"] if c["name"] in g4 else "-",
            ]
        )
    headers = ["Cell", *(f"{names[r]} marker" for r in roles), "max bystander", "ARC-C"]
    text = markdown_table([*headers, "Betley aligned (mean)", "Betley misaligned", "G4"], rows)
    reverse = [c for c in cells.values() if c["arm"] == "reverse"]
    if reverse:
        order = [r for r in ("source", "villain", "assistant") if r in roles]
        rows = [
            [c["stage1"], c["method"], *(rate2(c["rates"][r]) for r in order), arc_text(c["capability"])]
            for c in reverse
        ]
        headers = ["Stage 1", "Coupling method", *(f"{names[r]} rate" for r in order), "ARC-C"]
        text += "\n\nReverse order (stage 1, then coupling):\n\n" + markdown_table(headers, rows)
    if summary["contrasts"]:
        rows = [[t["contrast"], rate2(t["a"]), rate2(t["b"]), t["p_text"]] for t in summary["contrasts"]]
        text += "\n\nFisher exact tests (counts pooled over seeds):\n\n"
        text += markdown_table(["Contrast", "a", "b", "p"], rows)
    verdicts = [v["text"] for v in (summary["conjunction"], summary["g4"]) if v and v.get("text")]
    return text + "".join(f"\n\n{v}" for v in verdicts)


def publish(
    paths: Any,
    run: Any,
    results: Mapping[str, Mapping[str, Any]],
    infos: Sequence[CellInfo],
    *,
    wanted: Sequence[tuple[str, str, str, str]],
    marker: str,
    wall_s: float,
) -> str:
    """summary.json, headline.md and the figures of one run; returns the text the script prints.

    ``paths`` is the script's :class:`~explore_persona_space.orchestrate.ExperimentPaths`,
    ``run`` its :class:`~explore_persona_space.orchestrate.Resolved` scale, ``marker`` a marker name.
    """
    from explore_persona_space.experiments.marker_transfer.figures import draw_all
    from explore_persona_space.orchestrate import write_outputs
    from explore_persona_space.personas import get_marker

    scale = run.scale
    summary = summarize(
        results,
        infos,
        source=scale.source,
        marker=get_marker(marker),
        wanted=wanted,
        g4_below=scale.g4_aligned_below,
    )
    tag = f"{run.name} scale, {run.model}, source {scale.source}"
    drawn = draw_all(summary, paths.figures, tag)
    out = {"experiment": paths.name, **run.to_dict(), "wall_seconds": round(wall_s, 1), **summary}
    out["figures"] = [str(f.relative_to(paths.out)) for f in drawn]
    text = write_outputs(paths, out, headline(summary), f"#121 marker transfer ({tag})")
    return text + f"\nwall time {wall_s:.0f} s; figures in {paths.figures}"
