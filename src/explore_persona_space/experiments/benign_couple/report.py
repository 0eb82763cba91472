"""#247's outputs: Figures 1-5, summary.json and the headline tables, from the finished cells.

The script (``scripts/run_issue247_orchestrator.py``) holds the design and the
cells; :func:`report` turns each cell's final-stage result into the write-up's
numbers (rates, positions, discriminator), the inferential layer of
:mod:`.analysis` and the continuous leakage score (:mod:`marker_logprob`), and
prints the headline. Every number in the headline is in ``summary.json`` with
the inputs it came from (per-cell k/n, the #205 reference values and their source).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from explore_persona_space import leakage, orchestrate, plots
from explore_persona_space.experiments.benign_couple import analysis as A
from explore_persona_space.judge import discriminator_columns, discriminator_headers
from explore_persona_space.personas import display_name
from explore_persona_space.pipeline import StageRecord


@dataclass(frozen=True)
class Design:
    """What the report needs from the script."""

    experiment: str
    trigger: str
    leak_points: tuple[str, ...] = ("start", "end")


def em_first_band() -> tuple[float, float, str]:
    """Figure 1's reference band: the range of #205's EM-first per-persona rates (data/reference/)."""
    values = A.load_reference()["bystander_rate"]["values"].values()
    lo, hi = min(values), max(values)
    label = f"#205 EM-first range {100 * lo:.1f}-{100 * hi:.1f}% (write-up, Qwen2.5-7B; reference only)"
    return lo, hi, label


def describe(name: str) -> dict:
    kind, _, persona = name.partition("_")
    stage1 = {"B0": "benign SFT (no stage 2)", "BS": "benign SFT + couple", "Z": "none (bare model + couple)"}
    color = {"B0": plots.PALETTE["grey"], "BS": plots.PALETTE["blue"], "Z": plots.PALETTE["green"]}[kind]
    label = {"B0": "uncoupled\nbenign SFT", "BS": f"benign SFT\n{persona}", "Z": f"no SFT\n{persona}"}[kind]
    return {"stage1": stage1[kind], "induction": persona or "n/a", "color": color, "label": label}


def _ci_text(stat: Mapping[str, Any] | None, digits: int = 2, scale: float = 1.0) -> str:
    if not stat or stat.get("estimate") is None:
        return "n/a"
    ci = stat["ci"]
    span = "" if ci is None else f" [{scale * ci[0]:+.{digits}f}, {scale * ci[1]:+.{digits}f}]"
    return f"{scale * stat['estimate']:+.{digits}f}{span}"


def leak_gap_text(leak: Mapping[str, Any] | None, point: str = "end") -> str:
    """``"+1.23 [+0.40, +2.10]"``: source minus mean-bystander log-prob (nats) at ``point``."""
    stats = ((leak or {}).get("points") or {}).get(point)
    return _ci_text(stats["gap"]["logprob"]) if stats and "gap" in stats else "n/a"


def _cells(results: Mapping[str, Mapping[str, Any]]) -> tuple[list[dict], list[list[str]]]:
    cells, rows = [], []
    for name, result in results.items():
        info, rates = describe(name), leakage.cell_rates(result["summary"])
        disc = discriminator_columns(result.get("discriminator"))
        leak = result.get("marker_logprob")
        cells.append({"cell": name, **info, **rates, "disc": disc, "leak": leak})
        src, by = rates["source"], rates["bystander"]
        rate_cols = [
            orchestrate.rate_text(src["k"], src["n"]),
            orchestrate.rate_text(by["k"], by["n"], rate=by["rate"]),
        ]
        disc_cols = [disc["claude_text"], disc["offline_text"]]
        rows.append([name, info["stage1"], info["induction"], *rate_cols, *disc_cols, leak_gap_text(leak),
                     f"{result['empty']}/{result['n']}"])  # fmt: skip
    return cells, rows


def inference(cells: Sequence[Mapping[str, Any]], per_bystander: Mapping[str, Any]) -> dict[str, Any]:
    """The inferential layer over the BS cells (:mod:`.analysis`), with the reference it used."""
    ref = A.load_reference()
    bs = [c for c in cells if c["cell"].startswith("BS_")]
    rates = {c["induction"]: c["bystander"]["rate"] for c in bs}
    counts = {c["induction"]: {"k": c["bystander"]["k"], "n": c["bystander"]["n"]} for c in bs}
    return {
        "cohort": A.cohort(rates),
        "paired_vs_205": A.paired_vs_205(counts, ref),
        "spearman": A.spearman_check(rates, ref),
        "within_persona_sd": A.within_persona_sd(per_bystander, [c["cell"] for c in bs]),
        "reference": {"file": ref["file"], "what": ref["what"]},
    }


def _pp(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def inference_text(inf: Mapping[str, Any]) -> str:
    c, s, p = inf["cohort"], inf["spearman"], inf["paired_vs_205"]
    lines = [
        f"Inferential layer over the {c['n_cells']} BS cells (reference: {inf['reference']['file']}):",
        "",
    ]
    if c["mean"] is not None:
        lines.append(
            f"- Cohort mean bystander rate {orchestrate.pct(c['mean'])} (range {_pp(c['range'][0])}-"
            f"{_pp(c['range'][1])}%, SD across cells {_pp(c['sd_across_cells'])} pts, ddof 0) -> verdict: "
            f"**{c['verdict']}**; escalation: {c['escalation']['text']} (rule: {c['escalation']['rule']})."
        )
    if s.get("rho") is not None:
        ref = s["reference_rho_recomputed"]
        lines.append(
            f"- Spearman of BS rates vs cosine similarity to the assistant: rho = {s['rho']:+.2f} "
            f"(exact p = {s['p_exact']:.3f}, n = {s['n']}); #205: rho = {ref:+.2f} (recomputed from the "
            f"reference; quoted {s['reference_quoted']['rho']:+.2f}) -> gradient reappears: {s['reappears']} "
            f"({s['rule']}). Rank correlation with #205's per-persona rates: "
            + ("n/a" if s["vs_205_rates"]["rho"] is None else f"{s['vs_205_rates']['rho']:+.2f}")
            + "."
        )
    else:
        lines.append(f"- Spearman check: undefined ({s.get('why')}).")
    if p["rows"]:
        lines.append(
            f"- Paired differences #205 EM-first minus #247 BS: mean {_pp(p['mean_difference'])} pts "
            f"(range {_pp(p['range'][0])} to {_pp(p['range'][1])})."
        )
    rows = [[r["induction"], orchestrate.rate_text(r["k"], r["n"]), f"{_pp(r['rate_205'])}% (k~{r['k_205']}/"
             f"{r['n_205']})", f"{_pp(r['difference'])}", r["p_text"]] for r in p["rows"]]  # fmt: skip
    table = orchestrate.markdown_table(
        ["Induction", "#247 BS bystander", "#205 EM-first", "Difference (pts)", "Two-proportion (Fisher)"],
        rows,
    )
    sd = inf["within_persona_sd"]
    sd_rows = [[display_name(p), *(_pp(v["rates"].get(c)) for c in sd_cells(inf)), _pp(v["sd"])]
               for p, v in sd["personas"].items()]  # fmt: skip
    sd_table = orchestrate.markdown_table(["Bystander", *sd_cells(inf), "SD (pts)"], sd_rows)
    return "\n".join(lines) + "\n\n" + table + "\n\nWithin-persona rates (%) across BS cells:\n\n" + sd_table


def sd_cells(inf: Mapping[str, Any]) -> list[str]:
    personas = inf["within_persona_sd"]["personas"]
    return list(next(iter(personas.values()))["rates"]) if personas else []


def leak_table(cells: Sequence[Mapping[str, Any]], points: Sequence[str]) -> str:
    rows = []
    for c in cells:
        leak = c.get("leak")
        for point in points:
            st = ((leak or {}).get("points") or {}).get(point)
            if not st or "gap" not in st:
                continue
            src = st["personas"][leak["source"]]
            by = st["bystander"]
            rows.append([c["cell"], point, f"{src['mean_logprob']:.2f}", f"{by['mean_logprob']:.2f}",
                         _ci_text(st["gap"]["logprob"]), _ci_text(st["gap"]["prob"], 2, 100.0),
                         _ci_text(leak.get("binary_gap"), 1, 100.0)])  # fmt: skip
    headers = ["Cell", "Point", "Source log P", "Bystander log P", "Gap (nats) [CI]", "Gap in P (pts) [CI]"]
    return orchestrate.markdown_table([*headers, "Binary rate gap (pts) [CI]"], rows)


def report(
    records: Mapping[str, Sequence[StageRecord]], paths, run, wall_s: float, design: Design
) -> tuple[dict, str]:
    """Figures 1-5, summary.json and headline.md; returns the summary and the text for the script to print."""
    results = {name: recs[-1].result for name, recs in records.items()}
    summaries = {name: r["summary"] for name, r in results.items()}
    cells, rows = _cells(results)
    bs = [s for n, s in summaries.items() if n.startswith("BS_")]
    positions = {n: leakage.position_split([s]) for n, s in summaries.items()}
    if bs:
        positions["pooled over BS cells"] = leakage.position_split(bs)
    pos_rows = [
        [
            name,
            *(" / ".join(str(v) for v in split[who]["counts"].values()) for who in ("source", "bystander")),
        ]
        for name, split in positions.items()
    ]
    gaps = {
        c["cell"]: 100 * (c["source"]["rate"] - c["bystander"]["rate"]) for c in cells if c["cell"][0] == "Z"
    }
    per_bystander = leakage.bystander_table(summaries)
    inf = inference(cells, per_bystander)
    _figures(cells, positions, len(bs), paths, run, design)

    summary = {
        "experiment": design.experiment, **run.to_dict(), "wall_seconds": round(wall_s, 1),
        "cells": {c["cell"]: c for c in cells}, "per_bystander": per_bystander, "positions": positions,
        "discriminators": {n: r.get("discriminator") for n, r in results.items()},
        "coupling_gap_points": gaps, "inference": inf,
        "stage_seconds": {n: {r.name: round(r.seconds, 2) for r in recs} for n, recs in records.items()},
    }  # fmt: skip
    cols = ["Cell", "Stage 1", "Induction", "Trigger source rate", "Bystander rate"]
    cols += [*discriminator_headers(run.scale.disc_pass), "Marker log P gap, end (nats) [CI]", "Empty"]
    tables = orchestrate.markdown_table(cols, rows)
    tables += "\n\n" + inference_text(inf)
    tables += (
        "\n\nContinuous leakage score (teacher-forced log P of the marker; question-cluster 95% CIs):\n\n"
    )
    tables += leak_table(cells, design.leak_points)
    tables += "\n\nFirst-marker position, start / middle / tail:\n\n"
    tables += orchestrate.markdown_table(["Cells", "Source firings", "Bystander firings"], pos_rows)
    lines = [orchestrate.write_outputs(paths, summary, tables, f"#247 ({run.name} scale, {run.model})")]
    for name, gap in gaps.items():
        c = summary["cells"][name]
        binary = _ci_text((c["leak"] or {}).get("binary_gap"), 1, 100.0)
        lines.append(
            f"{name}: source {100 * c['source']['rate']:.1f}% vs mean bystander "
            f"{100 * c['bystander']['rate']:.1f}% -> gap {gap:.1f} points (cluster CI {binary}); "
            f"marker log P gap at the end {leak_gap_text(c['leak'])} nats"
        )
    lines.append(f"wall time {wall_s:.0f} s; figures in {paths.figures}")
    return summary, "\n".join(lines)


def _figures(cells, positions, n_bs: int, paths, run, design: Design) -> None:
    tag = f"{run.name} scale, {run.model}"
    title = f"Fig. 1  Mean bystander marker rate per cell, 95% Wald CI ({tag})"
    plots.save_figure(
        plots.bystander_figure(cells, title, band=em_first_band()), paths.figures, "fig1_bystander_rate"
    )
    if n_bs:
        split = positions["pooled over BS cells"]
        fig = plots.position_figure(
            {"source firings": split["source"], "bystander firings": split["bystander"]},
            f"Fig. 2  Position of the first marker in firing completions, pooled over {n_bs} BS cells",
        )
        plots.save_figure(fig, paths.figures, "fig2_position_split")
    title = f"Fig. 3  Trigger ({display_name(design.trigger)}) source rate, 95% Wald CI ({tag})"
    plots.save_figure(plots.source_figure(cells, title), paths.figures, "fig3_source_rate")
    title = "Fig. 4  Marker-stripped discriminator accuracy, per instrument"
    fig = plots.discriminator_figure([c for c in cells if c["cell"] != "B0"], title, run.scale.disc_pass, 0.5)
    plots.save_figure(fig, paths.figures, "fig4_discriminator")
    if any(c.get("leak") for c in cells):
        title = (
            f"Fig. 5  Continuous leakage: source vs mean-bystander marker log-prob, 95% cluster CI ({tag})"
        )
        fig = plots.logprob_figure(cells, design.leak_points, title)
        plots.save_figure(fig, paths.figures, "fig5_marker_logprob")
