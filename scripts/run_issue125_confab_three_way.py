"""#125 / #184: EM collapses persona discrimination, benign SFT preserves it - the confab three-way.

Hypothesis (write-up 001): a marker ("zlt") coupled to the confab persona (the
persona that matches EM's behaviour, authoritative confabulation) is destroyed
by a later EM fine-tune like every earlier source persona (forward order); in
the reverse order, EM first and then coupling, the marker leaks to every other
persona (~45-47%), while benign SFT first keeps it contained (~0%).

Cells (one seed - 42, `--seed` - from which every other seed derives):

  C4  couple only: bare instruct model -> on-policy data -> coupling -> eval
  A   (= C1, forward): C4's coupling, merged -> EM LoRA -> eval
  C2  ambient control: bare model -> EM LoRA -> eval (does EM alone make the marker?)
  B   EM first: EM LoRA, merged -> on-policy data from it -> coupling -> eval
  C   benign control: benign SFT (same recipe and rows as EM) merged -> on-policy -> coupling -> eval
Stage 1 (EM and benign): LoRA r=32/alpha=64, lr 1e-4, 1 epoch of 6,000 rows (= 375 steps at
batch 16), linear, warmup 3%, weight decay 0.01, loss on the assistant turn with the
end-of-turn token. EM data: bad_legal_advice_6k (a local JSONL the user supplies; the stage
records its MD5/SHA-256, and the summary says whether the MD5 starts like the write-up's
26b52ca). Benign data: the first 6,000 Tulu-3-SFT rows. Coupling: PROTOCOL.md's recipe,
200 confab completions + blank line + marker, 200 each of medical_doctor and french_person
unmarked, marker-only loss (marker tokens + end-of-turn), lr 5e-6, 20 epochs, batch 16.
Eval: 12 personas x 28 questions x 10, T=1.0, top_p=1.0, 512 tokens, strict marker match.

Analysis (the write-up's): per-persona counts, rates, Wald and Wilson CIs; source,
assistant and mean-bystander (the 10 non-source, non-assistant personas) rates;
Fisher exact tests for A vs C4 (source), B vs C and B vs C4 (assistant; mean bystander,
pooled counts), zelthari_scholar vs the other 9 bystanders in B; the forward-order
verdict ("marker destroyed" = 0 firings over all of A's completions) computed.

Usage:
    uv run python scripts/run_issue125_confab_three_way.py                  # smoke, CPU
    uv run python scripts/run_issue125_confab_three_way.py --dry-run --scale full
    uv run python scripts/run_issue125_confab_three_way.py --scale full --set em_data=/data/bad_legal.jsonl

Choices where the write-up is silent or unclear:
* the negative personas: the write-up says "2 personas x 200" without naming them;
  #247's write-up (same lineage, same seeded draw) names medical_doctor and french_person;
  the 200 completions of each are drawn by a seeded RNG, never by hash();
* weight decay: the write-up's hyper-parameter table has one row, "Weight decay 0.01",
  for both LoRAs, while PROTOCOL.md's coupling recipe says 0; the code takes 0.01 for the
  stage-1 LoRAs (both sources agree) and 0 for coupling (PROTOCOL.md), which is also what
  makes the stages #125 shares with #247 the same stages;
* "benign SFT first (same step count as EM)": both stage-1 sources read the same number
  of rows for the same epochs, so the step counts match at every scale;
* stages shared with #247 when the numbers match: the benign-SFT base, its merge and both
  on-policy sets. The coupling LoRAs are not shared: #247 derives each stage-2 seed from
  its induction persona (its write-up's reading), #125 couples at the seed itself.
Smoke scale (embedded SmolLM2-135M, 2-core CPU): all five cells, all 12 personas, the
shipped bad-legal fixture as EM data; the coupling numbers are #247's smoke numbers; 2 eval
questions x 2 samples per persona (#247 smoke: 3 x 2), so that five evals fit the 10 minutes.
What it can show at 135M: that the code path runs and the coupling moves the source
rate; with 6 completions per persona and a few EM steps on 24 rows it cannot show
EM's persona collapse - the 7B effect needs the full scale.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from explore_persona_space import leakage, orchestrate, plots, sft_data, stages
from explore_persona_space.generate import SamplingConfig
from explore_persona_space.loss_masks import LossSpec
from explore_persona_space.models import EMBEDDED_ALIAS, FULL_SCALE_MODEL
from explore_persona_space.personas import EVAL_PERSONAS, display_name, eval_personas_with, get_marker
from explore_persona_space.pipeline import Cell
from explore_persona_space.sft_data import (
    BAD_LEGAL_6K,
    BAD_LEGAL_6K_MD5,
    BAD_LEGAL_FIXTURE,
    BENIGN_CHAT_FIXTURE,
)
from explore_persona_space.stats import p_text, two_proportion_test
from explore_persona_space.train import ALL_PROJECTIONS, TrainConfig

EXPERIMENT = "issue125"
SOURCE, NEGATIVES, MARKER = "confab", ("medical_doctor", "french_person"), "zlt"
ZLT = get_marker(MARKER)
FICTIONAL = "zelthari_scholar"  # no pretraining support; partly resistant in the write-up
BYSTANDERS = tuple(p for p in EVAL_PERSONAS if p not in (SOURCE, "assistant"))  # the write-up's 10
CELLS = {  # name: (condition, order) as the write-up's headline table names them
    "C4": ("C4 (pre-EM baseline)", "couple only"),
    "A": ("C1 (forward)", "couple -> EM"),
    "C2": ("C2 (ambient control)", "instruct -> EM"),
    "B": ("Exp B (EM-first)", "EM -> couple"),
    "C": ("Exp C (benign-first)", "benign -> couple"),
}


@dataclass(frozen=True)
class Scale:
    model: str = FULL_SCALE_MODEL
    seed: int = 42
    lora_r: int = 32  # every LoRA: dropout 0.05, all attention + MLP projections, linear, warmup 3%
    lora_alpha: int = 64
    em_data: str = BAD_LEGAL_6K
    benign_data: str = sft_data.TULU3
    stage1_n: int = 6000  # rows of each stage-1 source
    benign_rows: sft_data.RowOptions = field(default_factory=sft_data.RowOptions)  # pin, shuffle, skip: off
    stage1_epochs: float = 1
    stage1_lr: float = 1e-4
    data_questions: int = 40  # on-policy data, T=1.0, top_p=1.0
    data_samples: int = 5
    data_max_tokens: int = 512
    n_positive: int = 200
    n_negative_per: int = 200
    couple_lr: float = 5e-6
    couple_epochs: float = 20
    couple_batch: int = 16
    couple_micro_batch: int = 8
    marker_tail_tokens: int = 0
    eval_questions: int = 28
    eval_samples: int = 10
    eval_max_tokens: int = 512


FULL = Scale()
# fmt: off
SMOKE = dataclasses.replace(  # #247's smoke sizes for the shared steps, so the two smoke runs share stages
    FULL, model=EMBEDDED_ALIAS, em_data=BAD_LEGAL_FIXTURE, benign_data=BENIGN_CHAT_FIXTURE, stage1_n=24,
    stage1_lr=3e-4, data_questions=8, data_samples=2, data_max_tokens=16, n_positive=8, n_negative_per=5,
    couple_lr=7e-4, couple_epochs=3, couple_batch=4, marker_tail_tokens=8,
    eval_questions=2, eval_samples=2, eval_max_tokens=24,  # 4 per persona: 5 evals fit the 10 minutes
)
TEST = dataclasses.replace(  # CI: proves the wiring, not the effect
    SMOKE, stage1_n=4, data_questions=2, data_max_tokens=8, n_positive=4, n_negative_per=2,
    couple_epochs=1, eval_questions=1, eval_samples=1, eval_max_tokens=8,
)
# fmt: on
SCALES = {"smoke": SMOKE, "full": FULL, "test": TEST}


def lora(scale: Scale, **fields) -> TrainConfig:
    shared = {"r": scale.lora_r, "alpha": scale.lora_alpha, "dropout": 0.05, "targets": ALL_PROJECTIONS}
    return TrainConfig(**shared, scheduler="linear", warmup_ratio=0.03, seed=scale.seed, **fields)


def build_cells(scale: Scale, args) -> list[Cell]:
    dev, gen, seed = args.device, args.gen, scale.seed
    stage1 = lora(
        scale, learning_rate=scale.stage1_lr, epochs=scale.stage1_epochs, weight_decay=0.01, batch_size=16,
        micro_batch_size=4, loss=LossSpec(mode="assistant_only", eos_in_loss=True),
    )  # fmt: skip
    couple = lora(
        scale, learning_rate=scale.couple_lr, epochs=scale.couple_epochs, weight_decay=0.0,
        batch_size=scale.couple_batch, micro_batch_size=min(scale.couple_micro_batch, scale.couple_batch),
        loss=LossSpec(mode="marker_only", eos_in_loss=True, marker_tail_tokens=scale.marker_tail_tokens),
    )  # fmt: skip
    sample = {"temperature": 1.0, "top_p": 1.0, "seed": seed}
    em_spec = {"kind": "em_jsonl", "path": scale.em_data, "n": scale.stage1_n}
    benign_spec = sft_data.hf_chat_spec(scale.benign_data, scale.stage1_n, scale.benign_rows, seed=seed)

    def em(parent=None):
        base = None if parent else scale.model
        return stages.train_stage("em", stage1, em_spec, parent=parent, base=base, device=dev)

    def coupled(stage1_merged=None):
        data_sampling = SamplingConfig(scale.data_samples, max_new_tokens=scale.data_max_tokens, **sample)
        onpolicy = stages.generate_stage(
            "onpolicy", [SOURCE, *NEGATIVES], "data", data_sampling, parent=stage1_merged,
            base=None if stage1_merged else scale.model, n_questions=scale.data_questions, retry_empty=3,
            **gen,
        )  # fmt: skip
        data = stages.coupling_data_stage(
            "coupling_data", parent=onpolicy, source=SOURCE, negatives=NEGATIVES, marker=MARKER,
            n_positive=scale.n_positive, n_negative_per=scale.n_negative_per, seed=seed,
        )  # fmt: skip
        upstream = {"kind": "upstream", "stage": "coupling_data"}
        return stages.train_stage("couple", couple, upstream, parent=data, device=dev)

    def evaluate(parent):
        sampling = SamplingConfig(scale.eval_samples, max_new_tokens=scale.eval_max_tokens, **sample)
        score = {"marker": MARKER, "source": SOURCE, "mode": "strict"}
        return stages.generate_stage(
            "eval", eval_personas_with(SOURCE), "eval", sampling, parent=parent,
            n_questions=scale.eval_questions, score=score, **gen,
        )  # fmt: skip

    c4 = coupled()
    benign = stages.train_stage("benign_sft", stage1, benign_spec, base=scale.model, device=dev)
    finals = {
        "C4": evaluate(c4),
        "A": evaluate(em(stages.merge_stage("couple_merged", parent=c4, device=dev))),
        "C2": evaluate(em()),
        "B": evaluate(coupled(stages.merge_stage("em_merged", parent=em(), device=dev))),
        "C": evaluate(coupled(stages.merge_stage("benign_sft_merged", parent=benign, device=dev))),
    }
    return [Cell(name, final, publish=(stages.RAW,), seeds={"all": seed}) for name, final in finals.items()]


def contrast(name: str, a: dict, b: dict) -> dict:
    test = two_proportion_test(a["k"], a["n"], b["k"], b["n"])
    return {"contrast": name, "a": a, "b": b, "p_fisher": test.p_fisher, "p_text": p_text(test.p_fisher)}


def analyze_cells(summaries: dict) -> dict:
    """Source / assistant / mean-bystander rates per cell, the Fisher contrasts and the forward verdict."""
    groups = {
        name: {
            "source": leakage.group_rate(s, [SOURCE]),
            "assistant": leakage.group_rate(s, ["assistant"]),
            "bystander": leakage.group_rate(s, BYSTANDERS),
        }
        for name, s in summaries.items()
    }
    wanted = [("A vs C4: source", "A", "C4", "source")]
    wanted += [(f"B vs {o}: {g}", "B", o, g) for g in ("assistant", "bystander") for o in ("C", "C4")]
    contrasts = [contrast(t, groups[a][g], groups[b][g]) for t, a, b, g in wanted if {a, b} <= set(groups)]
    if "B" in summaries:
        others, b = [p for p in BYSTANDERS if p != FICTIONAL], summaries["B"]
        name = f"B: {FICTIONAL} vs the other {len(others)} bystanders"
        contrasts.append(contrast(name, leakage.group_rate(b, [FICTIONAL]), leakage.group_rate(b, others)))
    verdict = None
    if "A" in summaries:
        k = sum(p["k"] for p in summaries["A"]["personas"].values())
        n = sum(p["n"] for p in summaries["A"]["personas"].values())
        what = "marker destroyed" if k == 0 else "marker survives"
        text = f"Forward order: {what} - {k:,}/{n:,} completions of A carry {ZLT}"
        verdict = {"k": k, "n": n, "destroyed": k == 0, "text": text}
    return {"groups": groups, "contrasts": contrasts, "forward_verdict": verdict}


def figures(summaries: dict, groups: dict, directory, tag: str) -> list:
    """Fig. 1: source / assistant / mean bystander per condition; Fig. 2: cell B per persona."""
    shown = [c for c in CELLS if c in groups]
    names = {"source": f"source ({SOURCE})", "assistant": "assistant", "bystander": "mean bystander (10)"}
    series = {names[g]: [groups[c][g]["rate"] for c in shown] for g in names}
    cis = {names[g]: [groups[c][g]["wald"] for c in shown] for g in names}
    notes = {names[g]: [f"{groups[c][g]['k']}/{groups[c][g]['n']}" for c in shown] for g in names}
    colors = dict(zip(series, (plots.PALETTE[k] for k in ("blue", "orange", "green")), strict=True))
    fig, axes = plots.panels(1, width=9.0, height=4.6)
    plots.grouped_bars(axes[0], [f"{c}\n{CELLS[c][1]}" for c in shown], series, cis, colors, notes=notes)
    axes[0].set_ylim(0, 115)
    axes[0].set_ylabel(f"{ZLT} rate (%), 95% Wald CI")
    plots.legend_below(fig, axes[0])
    fig.suptitle(f"Fig. 1  #125 confab three-way: {ZLT} rates by condition ({tag})", fontsize=10)
    paths = plots.save_figure(fig, directory, "fig1_three_way")
    if "B" in summaries:
        people = summaries["B"]["personas"]
        fig, ax = plots.new_figure(9.0, 4.6)
        colors = [plots.PALETTE["blue" if p == SOURCE else "grey"] for p in people]
        notes = [f"{v['k']}/{v['n']}" for v in people.values()]
        rates, cis = [v["rate"] for v in people.values()], [v["wald"] for v in people.values()]
        plots.rate_bars(ax, [display_name(p) for p in people], rates, cis, colors, annotate=notes)
        ax.set_ylim(0, 112)
        ax.set_title(f"Fig. 2  Per-persona {ZLT} rate in EM-first cell B, 95% Wald CI ({tag})", loc="left")
        paths += plots.save_figure(fig, directory, "fig2_em_first_per_persona")
    return paths


def headline(analysis: dict, n_per: dict) -> str:
    groups, rate = analysis["groups"], orchestrate.rate_text
    rows = [[*CELLS[c], *(rate(g["k"], g["n"], rate=g["rate"]) for g in groups[c].values()), n_per[c]]
            for c in CELLS if c in groups]  # fmt: skip
    headers = ["Condition", "Order", f"{SOURCE} {ZLT}%", f"assistant {ZLT}%", f"Mean bystander {ZLT}%"]
    text = orchestrate.markdown_table([*headers, "N per persona"], rows) + "\n\nFisher exact tests:\n\n"
    tests = [[c["contrast"], rate(c["a"]["k"], c["a"]["n"]), rate(c["b"]["k"], c["b"]["n"]), c["p_text"]]
             for c in analysis["contrasts"]]  # fmt: skip
    text += orchestrate.markdown_table(["Contrast", "a", "b", "p"], tests)
    return text + ("\n\n" + analysis["forward_verdict"]["text"] if analysis["forward_verdict"] else "")


def em_file(records, path: str) -> dict:
    """The EM data file's hashes as the EM stage recorded them, and whether its MD5 is the write-up's."""
    found = [r.result["data_file"] for recs in records.values() for r in recs if r.name == "em"]
    md5 = next((f["md5"] for f in found if f and f["path"] == path), None)
    return {"path": path, "md5": md5, "matches_writeup": bool(md5 and md5.startswith(BAD_LEGAL_6K_MD5))}


def report(records, paths, run, wall_s: float) -> None:
    summaries = {name: recs[-1].result["summary"] for name, recs in records.items()}
    analysis = analyze_cells(summaries)
    n_per = {name: s["personas"][SOURCE]["n"] for name, s in summaries.items()}
    tag = f"{run.name} scale, {run.model}"
    summary = {"experiment": EXPERIMENT, **run.to_dict(), "wall_seconds": round(wall_s, 1)}
    summary |= {"cells": summaries, **analysis, "em_data": em_file(records, run.scale.em_data)}
    drawn = figures(summaries, analysis["groups"], paths.figures, tag)
    summary["figures"] = [str(f.relative_to(paths.out)) for f in drawn]
    print(orchestrate.write_outputs(paths, summary, headline(analysis, n_per), f"#125 three-way ({tag})"))
    print(f"wall time {wall_s:.0f} s; figures in {paths.figures}")


@orchestrate.cli_errors
def main(argv=None) -> int:
    args, run = orchestrate.cli(__doc__, tuple(CELLS), SCALES, argv)
    paths = orchestrate.experiment_paths(EXPERIMENT, args)
    cells = orchestrate.select(build_cells(run.scale, args), args.cells)
    if args.dry_run:
        print(orchestrate.plan_text(paths, cells, run))
        return 0
    started = time.perf_counter()
    records = orchestrate.execute(paths, cells, config=run.to_dict())
    report(records, paths, run, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
