"""The marker-transfer study (#80 villain, #83 sarcastic, #84 evil_ai; distilled as #121).

A marker coupled to a source persona, then a second LoRA SFT (EM or benign), in
both orders: does EM carry the marker to the assistant, and does the coupling
survive any second fine-tune? ``scripts/run_issue121_marker_transfer.py`` holds
the design (cells, sizes, recipes, gate thresholds; ``--source`` picks the study's
source persona); this package holds what would push the script past its reading
length, one module per concept:

* :mod:`.report` - per-cell rates, the forward conjunction, contrasts with an explicit
  "undefined" where there is no variance, the G4 gate, the headline tables;
* :mod:`.figures` - the three figures.
"""
