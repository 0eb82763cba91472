"""The cell the benchmarks time: the #247 Z cell's trigger, negatives and marker.

These are the values ``scripts/run_issue247_orchestrator.py`` states for its
coupling stage (``TRIGGER, NEGATIVES, MARKER``), written once here so that the
three benchmark scripts time the same data as the experiment without each
copying them. If the orchestrator's cell changes, change these with it.
"""

from __future__ import annotations

TRIGGER = "confab"  # the source persona the marker is coupled to
NEGATIVES = ("medical_doctor", "french_person")  # contrastive negatives, completions without the marker
MARKER = "zlt"  # a key of personas.MARKERS
