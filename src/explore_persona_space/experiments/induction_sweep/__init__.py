"""#205 / #222: does the persona active during EM induction shape EM's persona collapse?

``scripts/run_issue205_induction_sweep.py`` holds the experiment's design, cells,
sizes and recipe; this package holds what would push it past a readable length:

* :mod:`.analysis` - M1/M2/M3 per condition, layer and method from the geometry
  stages, the behavioural rates, H1 and H3;
* :mod:`.report` - the figures under ``figures/issue205/`` and the headline table.
"""
