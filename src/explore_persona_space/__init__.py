"""explore_persona_space: the shared package behind the per-issue experiment scripts.

One module per concept: ``personas`` (registry, markers, question banks), ``data``
(marker dataset builders), ``metrics`` (marker detection and rates), ``stats``
(CIs and tests), ``results`` (result files and provenance), ``analyze`` (the
re-scoring CLI). Importing the package imports none of the heavy ML libraries.
"""

__version__ = "0.1.0"
