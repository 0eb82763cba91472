"""#261 - does a second marker B ride on a shared start marker A from a donor to a recipient persona?

Hypothesis (chunk-binding): if a donor persona is taught ``A answer B`` and a
recipient persona only ``A answer``, A becomes a key for B, so the recipient
emits B whenever it emits A. The rival (persona-conditioning) predicts the
recipient stays silent on B. Write-up: research_log/002_82451eddd93fdacd.txt.

Steps (cells and numbers below; the study's shared stage kinds, scoring and tables
in ``explore_persona_space.experiments.two_marker``):

1. On-policy data: the base model answers the 40 data questions x 5 samples for
   every eval persona (one stage, shared by all six adapters and by #354).
2. Datasets, 2 pairs (villain -> assistant, librarian -> software_engineer) x 3
   conditions: T chunk-on-donor (donor ``A answer B``, recipient ``A answer``),
   C control (no B anywhere), T_P2neg recipient-as-negative (recipient unmarked);
   200 donor + 200 recipient + 4 negatives x 200 = 1,200 examples per adapter.
3. LoRA r=16, alpha=32, full-token loss WITH the end-of-turn token, lr 1e-5,
   3 epochs, cosine, warmup 5%, batch 16, max length 1024, seed 42.
4. Eval: 11 personas x (20 ID + 6 OOD questions) x 10, T=1.0, top_p=0.95, 600
   tokens; loose matching (strict as a cross-check); the T adapters also run the
   weird-marker probe (probe marker prepended to 5 recipient questions x 10).
   A base-model floor cell scores the untrained model (11 x 3 x 1 = 33).
5. Metrics per persona and role: A, B, joint, P(B|A), chunk and suffix
   signatures, ID vs OOD; question-cluster bootstrap CIs (B=2000, seed 42);
   six donor-coherence gates and the falsification gate per pair; the ID/OOD
   heterogeneity trigger (a load-bearing P(B|A) - donor in T, recipient in T
   and C - differing by >= 15 points ID vs OOD lowers confidence); the most
   P(B|A)-prone bystander over the recipient in T (the write-up's "~29x");
   the headline lists every persona on its own row; figures (the position
   figure per role within each cell).

Usage:

    uv run python scripts/run_issue261_within_marker.py                      # smoke, CPU, < 10 min idle
    uv run python scripts/run_issue261_within_marker.py --dry-run --scale full
    uv run python scripts/run_issue261_within_marker.py --scale full --model qwen2.5-7b
    uv run python scripts/run_issue261_within_marker.py --cells pair1_T pair1_C   # a subset
    uv run python scripts/run_issue261_within_marker.py --set train.learning_rate=3e-5 --seed 137

A rerun reuses every finished stage. Outputs: eval_results/issue261/<cell>/
{run_result.json, raw_completions.json[, probe_completions.json]},
eval_results/issue261/{summary.json, headline.md}, figures/issue261/*.{png,pdf}.

Choices where the write-up is silent (shared with #354):

* on-policy sampling uses the eval settings (T=1.0, top_p=0.95, 600 tokens)
  with up to 3 re-draws of empty completions; the dataset drops empties and
  fails loudly if a persona is left with fewer than 200;
* OOD questions are the first 6 of the shipped "ood" bank; the probe uses the
  first 5 ID questions; the floor probe uses the first 3 ID questions x 1 sample;
* P(B|A) is undefined (not 0) when A never fired; a gate on an undefined value
  reads UNDEFINED; the falsification gate PASSes when |T - C| <= 6 points AND
  the paired question-cluster CI of T - C holds 0 (chunk-binding falsified);
* the sixth sanity gate (control recipient B rate <= 5%) reads the C cell, the
  other five the T cell; B=2000 everywhere;
* the sanity-gate count printed is the one the code computes. Write-up 002 says
  "On this run pair1 failed 2 of 6 thresholds and pair2 failed 4 of 6", but by its
  own table pair2 fails five: donor A 48.8% < 80%, donor B 39.6% < 80%, donor
  P(B|A) 81.1% < 90%, recipient A 30.4% < 80%, and the donor P(B|A) CI low
  ("cluster CI on conditional rate [71.2, 88.5]") 71.2% < 80%; only the control
  recipient's B rate (0.0% <= 5%) passes. (Pair1's 2 of 6 agrees.)
* the ratio is computed from counts: 0.38 (19 of 50) / 0.0127 (1 of 79) = 30.0;
  the write-up's "38.0 / 1.3 = 29.2" divides rounded percentages;
* one seed (42, ``--seed``) for everything: on-policy, eval, probe and floor
  sampling, the dataset draw, the LoRA init and batches, every bootstrap;
* the smoke scale (SMOKE below, derived from FULL) keeps all cells and
  personas, shrinks sizes and raises the learning rate 500x (A fires only
  partly and B rarely at that size); `--scale test` is the CI-sized run;
* when the probe's sampling equals the eval's (it does at full and smoke
  scale), eval and probe prompts go through one generation call (one model
  load, one vLLM engine).
"""

from __future__ import annotations

import dataclasses
import sys

from explore_persona_space import orchestrate as O
from explore_persona_space.experiments.two_marker import plots as P
from explore_persona_space.experiments.two_marker import report as R
from explore_persona_space.experiments.two_marker import stages as S
from explore_persona_space.experiments.two_marker.scoring import Design, Gates, Pair
from explore_persona_space.experiments.two_marker.stages import Scale
from explore_persona_space.generate import SamplingConfig
from explore_persona_space.loss_masks import LossSpec
from explore_persona_space.models import EMBEDDED_ALIAS, FULL_SCALE_MODEL
from explore_persona_space.train import ALL_PROJECTIONS, TrainConfig

DESIGN = Design(
    experiment="issue261",
    title="#261 two-marker chunk (A answer B, EOS in loss)",
    # pair1 is near in persona-vector cosine distance, pair2 far (#232)
    pairs=(Pair("pair1", "villain", "assistant"), Pair("pair2", "librarian", "software_engineer")),
    negatives=("comedian", "kindergarten_teacher", "french_person", "medical_doctor"),
    placement="fixed",  # donor: A <answer> B; recipient: A <answer>
    match_mode="loose",  # headline; strict beside it as a cross-check
)


# Every number of the protocol (PROTOCOL.md #261), spelled out; Scale's fields say what each one sizes.
_EVAL = SamplingConfig(n_samples=10, temperature=1.0, top_p=0.95, max_new_tokens=600)
# fmt: off
FULL = Scale(
    model=FULL_SCALE_MODEL, seed=42,
    onpolicy=dataclasses.replace(_EVAL, n_samples=5), onpolicy_questions=40, onpolicy_every_persona=True,
    n_per_persona=200,
    train=TrainConfig(
        r=16, alpha=32, dropout=0.05, targets=ALL_PROJECTIONS, learning_rate=1e-5, epochs=3,
        scheduler="cosine", warmup_ratio=0.05, weight_decay=0.0, batch_size=16, micro_batch_size=4,
        max_length=1024, loss=LossSpec(mode="full_token", eos_in_loss=True),
    ),
    eval=_EVAL, id_questions=20, ood_questions=6,
    probe=_EVAL, probe_questions=5,
    floor=dataclasses.replace(_EVAL, n_samples=1), floor_questions=3,
    n_boot=2000,
    gates=Gates(
        donor_a_min=0.80, donor_b_min=0.80, donor_p_b_given_a_min=0.90, recipient_a_min=0.80,
        donor_p_b_given_a_ci_low_min=0.80, control_recipient_b_max=0.05, falsification_band=0.06,
        heterogeneity_points=0.15,
    ),
)
# fmt: on
# Smoke, derived from FULL in one visible place: same cells, same personas (all six adapters, all 11
# eval personas), same code path; sizes cut for a 2-core CPU (365 s measured 2026-12-02). Answers are cut to
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


@O.cli_errors
def main(argv: list[str] | None = None) -> int:
    args, run = O.cli(__doc__, DESIGN.cell_names(), SCALES, argv)
    paths = O.experiment_paths(DESIGN.experiment, args)
    all_cells = S.build_cells(DESIGN, run.scale, **args.gen)
    cells = O.select(all_cells, args.cells)
    if args.dry_run:
        print(O.plan_text(paths, cells, run))
        return 0
    O.execute(paths, cells, config={"experiment": DESIGN.experiment, **run.to_dict()})
    summary = R.summarize(S.finished_results(paths.store, all_cells), design=DESIGN, run=run)
    figures = P.all_figures(summary, DESIGN.pairs, paths.figures)
    summary["figures"] = [str(f.relative_to(args.out)) for f in figures]
    print(O.write_outputs(paths, summary, R.headline(summary, DESIGN), DESIGN.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
