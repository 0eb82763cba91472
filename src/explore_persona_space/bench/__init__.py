"""What the benchmark scripts in ``scripts/bench/`` share; no experiment imports it.

Kept apart from the experiment modules so that the bound formulas and the
benchmarked cell's constants are not mistaken for protocol code.
"""
