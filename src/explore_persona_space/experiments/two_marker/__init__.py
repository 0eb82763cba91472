"""The two-marker chunk study: #261 (``A answer B``, EOS in the loss) and its #354 re-run.

A *donor* persona is taught ``A answer B``, a *recipient* ``A answer`` (or
nothing, as a negative); does B ride on A to the recipient? The scripts
``scripts/run_issue261_within_marker.py`` and
``scripts/run_issue354_eos_masked_within_marker.py`` hold each experiment's
design, sizes, recipe and gate thresholds; this package holds what they share,
one module per concept:

* :mod:`.scoring` - roles, per-persona metrics with question-cluster CIs, gates;
* :mod:`.stages` - the dataset and two-marker eval stages, the cell list;
* :mod:`.report` - summary.json and the headline tables;
* :mod:`.plots` - the figures.
"""
