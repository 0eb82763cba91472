"""#247: benign SFT, then contrastive marker coupling - how far does the marker leak?

``scripts/run_issue247_orchestrator.py`` holds the design, cells, sizes and recipe;
this package holds what would push it past a readable length:

* :mod:`.analysis` - the inferential layer of write-up 000 (cohort mean and verdict,
  escalation rule, paired differences and tests against #205, the Spearman check,
  within-persona SDs), over the #205 reference in ``data/reference/``;
* :mod:`.report` - Figures 1-5, summary.json and the headline tables.
"""
