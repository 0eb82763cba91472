"""#354 - the #261 two-marker chunk experiment re-run with EOS masked and markers at non-fixed positions.

Hypothesis: #261 found no chunk-binding (recipient P(B|A) 0.0% / 1.3%), but every
donor example ended ``A answer B <end-of-turn>`` with the end-of-turn token in
the loss, so "emit B right before stopping" explained the donor's B as well as
"emit B after A" did. With the end-of-turn token out of the loss and A and B at
seeded non-fixed positions, B can only be learned as something that follows A.
The archive note reports chunk-binding reviving from 1.3% to 23.5% here.

Steps: exactly #261's (see scripts/run_issue261_within_marker.py and
``explore_persona_space.stages_two_marker``), except

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
    uv run python scripts/run_issue354_eos_masked_within_marker.py --scale full --model qwen2.5-7b

Outputs: eval_results/issue354/<cell>/{run_result.json, raw_completions.json,...},
eval_results/issue354/{summary.json, headline.md}, figures/issue354/*.{png,pdf}.
The on-policy data and the base floor are the very same stages as #261's (one
shared store under eval_results/issue261/stages), so they are computed once.

Choices where the write-ups are silent: as in #261's docstring. In addition,
B may land at the very end of the answer (as #261's did) - the design removes
the fixed position and the end-of-turn loss, not the end as one option among
many; and the comparison table pairs cells by name (same pair and condition).
"""

from __future__ import annotations

import sys

from explore_persona_space import orchestrate as O
from explore_persona_space import stages_two_marker as S
from explore_persona_space import within_marker as W
from explore_persona_space import within_marker_plots as P
from explore_persona_space import within_marker_report as R

DESIGN = W.DESIGNS["issue354"]
BASELINE = W.DESIGNS["issue261"]


def main(argv: list[str] | None = None) -> int:
    inv = S.invocation(DESIGN, __doc__, argv)
    if inv.args.dry_run:
        print(O.plan_text(inv.paths, inv.cells))
        return 0
    results, summary = S.run_and_summarize(inv, DESIGN)
    args, paths = inv.args, inv.paths
    gen = {"backend": args.backend, "device": args.device}
    baseline = S.finished_results(paths.stages, S.build_cells(BASELINE, inv.scale, args.model, **gen))
    table, rows = R.design_comparison(fixed=baseline, nonfixed=results)
    summary["design_comparison"] = rows
    figures = P.all_figures(summary, paths.figures) + P.design_comparison_figure(rows, paths.figures)
    summary["figures"] = [str(f.relative_to(args.out)) for f in figures]
    extra = "Recipient and donor P(B|A), #261 design vs this re-run:\n\n" + table
    print(O.write_outputs(paths, summary, R.headline(summary, extra), DESIGN.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
