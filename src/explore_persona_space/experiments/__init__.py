"""Code shared by the scripts of one study, one subpackage per study.

A study is a write-up and its re-runs (``two_marker``: #261 and the EOS-masked
#354). What the scripts of a study share - scoring, stage kinds, the report,
the figures - lives here; what each experiment decides (cells, sizes, recipe
numbers, gate thresholds) stays in its ``scripts/run_issueNNN_*.py``.
"""
