"""#354 - the #261 two-marker chunk experiment re-run with EOS masked and markers at non-fixed positions.

Hypothesis: #261 found no chunk-binding (recipient P(B|A) 0.0% / 1.3%), but every
donor example ended ``A answer B <end-of-turn>`` with the end-of-turn token in
the loss, so "emit B right before stopping" explained the donor's B as well as
"emit B after A" did. With the end-of-turn token out of the loss and A and B at
seeded non-fixed positions, B can only be learned as something that follows A.
The archive note reports chunk-binding reviving from 1.3% to 23.5% here.

Steps: exactly #261's (see scripts/run_issue261_within_marker.py; the study's
shared stages, scoring and tables in ``explore_persona_space.experiments.two_marker``),
with every number spelled out again below (identical to #261's), except

* placement ``nonfixed`` (data.two_marker_text): A after a random word in the
  first 60% of the answer, B after a random word anywhere after A (the end
  included), positions drawn from the dataset seed (42);
* loss ``full_token`` with ``eos_in_loss=False``: the end-of-turn token carries
  no loss in any example (donor, recipient or negative);
* a design-comparison table and figure: the recipient's (and donor's) P(B|A)
  under #261's design vs this one, read from #261's finished cells in the shared
  stage store (run #261 at the same scale and model first, or those columns read
  "not run").

Usage:

    uv run python scripts/run_issue354_eos_masked_within_marker.py                 # smoke, CPU
    uv run python scripts/run_issue354_eos_masked_within_marker.py --dry-run --scale full
    uv run python scripts/run_issue354_eos_masked_within_marker.py --scale full
    uv run python scripts/run_issue354_eos_masked_within_marker.py --set train.learning_rate=3e-5 --seed 137

Outputs: eval_results/issue354/<cell>/{run_result.json, raw_completions.json,...},
eval_results/issue354/{summary.json, headline.md}, figures/issue354/*.{png,pdf}.
The on-policy data and the base floor are the very same stages as #261's (one
stage store under eval_results/stages), so they are computed once.

Choices where the write-ups are silent: as in #261's docstring. In addition,
B may land at the very end of the answer (as #261's did) - the design removes
the fixed position and the end-of-turn loss, not the end as one option among
many; the comparison table pairs cells by name (same pair and condition); and
the #261 cells it compares with are this script's design and scale with fixed
placement and EOS in the loss (BASELINE below) - the two ways #261 differs - so
a run with --set or --seed compares against #261 run with the same overrides.
"""

from __future__ import annotations

import dataclasses
import sys

from explore_persona_space import orchestrate as O
from explore_persona_space import plots
from explore_persona_space.experiments.two_marker import plots as P
from explore_persona_space.experiments.two_marker import report as R
from explore_persona_space.experiments.two_marker import stages as S
from explore_persona_space.experiments.two_marker.scoring import CONDITION_LABELS, Design, Gates, Pair
from explore_persona_space.experiments.two_marker.stages import Scale
from explore_persona_space.generate import SamplingConfig
from explore_persona_space.loss_masks import LossSpec
from explore_persona_space.models import EMBEDDED_ALIAS, FULL_SCALE_MODEL
from explore_persona_space.train import ALL_PROJECTIONS, TrainConfig

DESIGN = Design(
    experiment="issue354",
    title="#354 EOS-masked re-run (A and B at non-fixed positions)",
    # pair1 is near in persona-vector cosine distance, pair2 far (#232)
    pairs=(Pair("pair1", "villain", "assistant"), Pair("pair2", "librarian", "software_engineer")),
    negatives=("comedian", "kindergarten_teacher", "french_person", "medical_doctor"),
    placement="nonfixed",  # A after a seeded word in the first 60%, B after a seeded word after A
    match_mode="loose",  # headline; strict beside it as a cross-check
)


# Every number of the protocol (PROTOCOL.md #261 and its re-run), spelled out; identical to #261's
# except eos_in_loss. Scale's fields say what each one sizes.
_EVAL = SamplingConfig(n_samples=10, temperature=1.0, top_p=0.95, max_new_tokens=600)
# fmt: off
FULL = Scale(
    model=FULL_SCALE_MODEL, seed=42,
    onpolicy=dataclasses.replace(_EVAL, n_samples=5), onpolicy_questions=40, onpolicy_every_persona=True,
    n_per_persona=200,
    train=TrainConfig(
        r=16, alpha=32, dropout=0.05, targets=ALL_PROJECTIONS, learning_rate=1e-5, epochs=3,
        scheduler="cosine", warmup_ratio=0.05, weight_decay=0.0, batch_size=16, micro_batch_size=4,
        max_length=1024, loss=LossSpec(mode="full_token", eos_in_loss=False),  # EOS masked everywhere
    ),
    eval=_EVAL, id_questions=20, ood_questions=6,
    probe=_EVAL, probe_questions=5,
    floor=dataclasses.replace(_EVAL, n_samples=1), floor_questions=3,
    n_boot=2000,
    gates=Gates(
        donor_a_min=0.80, donor_b_min=0.80, donor_p_b_given_a_min=0.90, recipient_a_min=0.80,
        donor_p_b_given_a_ci_low_min=0.80, control_recipient_b_max=0.05, falsification_band=0.06,
    ),
)
# fmt: on
# Smoke, derived from FULL in one visible place: same cells, same personas (all six adapters, all 11
# eval personas), same code path; sizes cut for a 2-core CPU (398 s measured 2026-12-02). Answers are cut to
# 16 tokens so the markers are a large share of each example, and the learning rate is raised 500x:
# 2 epochs over 36 short examples at 1e-5 do not move the model at all. Even so the 135M model picks
# up A only partly and B rarely: smoke checks the code path and the time budget, not the finding.
_SMOKE_EVAL = dataclasses.replace(FULL.eval, n_samples=2, max_new_tokens=40, batch_size=72)
SMOKE = dataclasses.replace(
    FULL,
    model=EMBEDDED_ALIAS,
    onpolicy=dataclasses.replace(FULL.onpolicy, n_samples=1, max_new_tokens=16, batch_size=64),
    onpolicy_questions=8,
    onpolicy_every_persona=False,
    n_per_persona=6,
    train=dataclasses.replace(
        FULL.train, epochs=2, batch_size=4, micro_batch_size=4, learning_rate=5e-3, max_length=256
    ),
    eval=_SMOKE_EVAL,  # 11 personas x 3 questions x 2 = 66 rows, + 4 probe rows: one batch
    id_questions=2,
    ood_questions=1,
    probe=_SMOKE_EVAL,
    probe_questions=2,
    floor=dataclasses.replace(_SMOKE_EVAL, n_samples=1),
    floor_questions=1,
)
# CI-sized: one optimizer step and a handful of short generations per stage.
_TEST_EVAL = dataclasses.replace(_SMOKE_EVAL, n_samples=1, max_new_tokens=8)
TEST = dataclasses.replace(
    SMOKE,
    onpolicy=dataclasses.replace(SMOKE.onpolicy, max_new_tokens=8),
    onpolicy_questions=2,
    n_per_persona=2,
    train=dataclasses.replace(SMOKE.train, max_steps=1, batch_size=2, micro_batch_size=2),
    eval=_TEST_EVAL,
    id_questions=1,
    probe=_TEST_EVAL,
    probe_questions=1,
    floor=dataclasses.replace(_TEST_EVAL, n_samples=1),
    n_boot=200,
)
SCALES = {"smoke": SMOKE, "full": FULL, "test": TEST}
COMPARED = ("recipient_fixed", "recipient_nonfixed", "donor_fixed", "donor_nonfixed")


def baseline(scale: Scale) -> tuple[Design, Scale]:
    """#261 as this run's design and scale with its two differences undone: fixed placement, EOS in loss."""
    loss = dataclasses.replace(scale.train.loss, eos_in_loss=True)
    design = dataclasses.replace(DESIGN, experiment="issue261", placement="fixed")
    return design, dataclasses.replace(scale, train=dataclasses.replace(scale.train, loss=loss))


def design_comparison(fixed: dict, nonfixed: dict) -> tuple[str, list[dict]]:
    """Recipient (and donor) P(B|A) under the #261 design versus this re-run, per pair x condition."""
    rows, data = [], []
    for name, pair, cond in DESIGN.adapter_cells():
        entry: dict = {"cell": name, "pair": pair.name, "condition": cond}
        for tag, results in (("fixed", fixed), ("nonfixed", nonfixed)):
            for role, persona in (("recipient", pair.recipient), ("donor", pair.donor)):
                s = results[name]["metrics"]["personas"][persona]["all"] if name in results else None
                entry[f"{role}_{tag}"] = s and {k: s[k] for k in ("p_b_given_a", "joint", "a")}
                entry[f"{role}_{tag}_ci"] = s and s["ci"]["p_b_given_a"]
        data.append(entry)

        def fmt(key: str, e: dict = entry) -> str:
            if e[key] is None:
                return "not run"
            if e[key]["p_b_given_a"] is None:
                return "undefined"
            return O.rate_text(e[key]["joint"], e[key]["a"]) + R.ci_text(e[f"{key}_ci"])

        rows.append([name, CONDITION_LABELS[cond], *(fmt(k) for k in COMPARED)])
    headers = ["cell", "condition", "recipient P(B|A) #261 fixed", "recipient P(B|A) #354 non-fixed"]
    return O.markdown_table([*headers, "donor P(B|A) #261", "donor P(B|A) #354"], rows), data


def comparison_figure(rows: list[dict], directory) -> list:
    fig, axes = plots.panels(len(DESIGN.pairs))
    for ax, pair in zip(axes, DESIGN.pairs, strict=True):
        mine = [r for r in rows if r["pair"] == pair.name]
        series, cis, notes = {}, {}, {}
        for tag, label in (("fixed", "#261 fixed, EOS in loss"), ("nonfixed", "#354 non-fixed, EOS masked")):
            stats = [r[f"recipient_{tag}"] for r in mine]
            series[label] = [s["p_b_given_a"] if s else None for s in stats]
            cis[label] = [r[f"recipient_{tag}_ci"] for r in mine]
            notes[label] = [f"{s['joint']}/{s['a']}" if s else "not run" for s in stats]
        colors = dict(zip(series, (plots.PALETTE["grey"], plots.PALETTE["blue"]), strict=True))
        plots.grouped_bars(ax, [r["condition"] for r in mine], series, cis, colors, notes=notes)
        ax.set_ylim(0, 115)
        ax.set_title(P.pair_title(pair), fontsize=10)
        ax.set_ylabel("recipient P(B | A) (%)")
    plots.legend_below(fig, axes[0])
    fig.suptitle("Recipient P(B|A): #261 design vs the #354 EOS-masked, non-fixed-position re-run")
    return plots.save_figure(fig, directory, "design_comparison")


@O.cli_errors
def main(argv: list[str] | None = None) -> int:
    args, run = O.cli(__doc__, DESIGN.cell_names(), SCALES, argv)
    paths = O.experiment_paths(DESIGN.experiment, args)
    gen = args.gen
    all_cells = S.build_cells(DESIGN, run.scale, **gen)
    cells = O.select(all_cells, args.cells)
    if args.dry_run:
        print(O.plan_text(paths, cells, run))
        return 0
    O.execute(paths, cells, config={"experiment": DESIGN.experiment, **run.to_dict()})
    results = S.finished_results(paths.store, all_cells)
    summary = R.summarize(results, design=DESIGN, run=run)
    fixed = S.finished_results(paths.store, S.build_cells(*baseline(run.scale), **gen))
    table, rows = design_comparison(fixed=fixed, nonfixed=results)
    summary["design_comparison"] = rows
    figures = P.all_figures(summary, DESIGN.pairs, paths.figures) + comparison_figure(rows, paths.figures)
    summary["figures"] = [str(f.relative_to(args.out)) for f in figures]
    extra = "Recipient and donor P(B|A), #261 design vs this re-run:\n\n" + table
    print(O.write_outputs(paths, summary, R.headline(summary, DESIGN, extra), DESIGN.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
