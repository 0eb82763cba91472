"""#261 - does a second marker B ride on a shared start marker A from a donor to a recipient persona?

Hypothesis (chunk-binding): if a donor persona is taught ``A answer B`` and a
recipient persona only ``A answer``, A becomes a key for B, so the recipient
emits B whenever it emits A. The rival (persona-conditioning) predicts the
recipient stays silent on B. Write-up: research_log/002_82451eddd93fdacd.txt.

Steps (all in ``explore_persona_space.stages_two_marker`` / ``within_marker``):

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
   six donor-coherence gates and the falsification gate per pair; figures.

Usage:

    uv run python scripts/run_issue261_within_marker.py                      # smoke, CPU, < 10 min idle
    uv run python scripts/run_issue261_within_marker.py --dry-run --scale full
    uv run python scripts/run_issue261_within_marker.py --scale full --model qwen2.5-7b
    uv run python scripts/run_issue261_within_marker.py --cells pair1_T pair1_C   # a subset

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
  other five the T cell; bootstrap seed 42 for every CI, B=2000 everywhere;
* the smoke scale (within_marker.SMOKE, derived from FULL) keeps all cells and
  personas, shrinks sizes and raises the learning rate 500x (A fires only
  partly and B rarely at that size); `--scale test` is the CI-sized run;
* when the probe's sampling equals the eval's (it does at full and smoke
  scale), eval and probe prompts go through one generation call (one model
  load, one vLLM engine).
"""

from __future__ import annotations

import sys

from explore_persona_space import orchestrate as O
from explore_persona_space import stages_two_marker as S
from explore_persona_space import within_marker as W
from explore_persona_space import within_marker_plots as P
from explore_persona_space import within_marker_report as R

DESIGN = W.DESIGNS["issue261"]


def main(argv: list[str] | None = None) -> int:
    inv = S.invocation(DESIGN, __doc__, argv)
    if inv.args.dry_run:
        print(O.plan_text(inv.paths, inv.cells))
        return 0
    _, summary = S.run_and_summarize(inv, DESIGN)
    args, paths = inv.args, inv.paths
    figures = P.all_figures(summary, paths.figures)
    summary["figures"] = [str(f.relative_to(args.out)) for f in figures]
    print(O.write_outputs(paths, summary, R.headline(summary), DESIGN.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
