"""Re-score saved completions without regenerating them.

    uv run python -m explore_persona_space.analyze RAW_COMPLETIONS.json --marker '[ZLT]' \
        [--source PERSONA] [--mode strict|loose|spaceless] [--loose] [--json]

Prints per-persona counts, rates, 95% Wald CIs and the start/middle/tail split of
first-marker positions, then the source rate and the mean bystander rate (the
unweighted mean over every persona but the source). ``--json`` prints one object
instead, in the shape :func:`analyze` returns.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from explore_persona_space.errors import InputError, cli_errors
from explore_persona_space.metrics import MODES, marker_counts, source_and_bystander
from explore_persona_space.results import read_raw_completions, to_json


def analyze(
    records: Sequence[Mapping[str, Any]],
    marker: str,
    *,
    loose: bool = False,
    source: str | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """Per-persona counts and rates; ``mode`` (strict | loose | spaceless, see :mod:`metrics`) wins
    over ``loose`` (True means ``mode="loose"``)."""
    mode = mode or ("loose" if loose else "strict")
    counts = marker_counts(records, marker, mode)
    source_rate, bystander = source_and_bystander(counts, source)
    return {
        "marker": marker,
        "mode": mode,
        "personas": {name: c.to_dict() for name, c in counts.items()},
        "source": source,
        "source_rate": source_rate,
        "bystander_mean": bystander,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_table(summary: Mapping[str, Any]) -> str:
    lines = [
        f"marker {summary['marker']!r} ({summary['mode']} match)",
        f"{'persona':<22}{'k/n':>11}{'rate':>8}  {'95% Wald CI':<16}{'start':>6}{'middle':>7}{'tail':>6}",
    ]
    for name, p in summary["personas"].items():
        lo, hi = p["wald"]
        tag = " (source)" if name == summary["source"] else ""
        pos = p["positions"]
        lines.append(
            f"{name + tag:<22}{p['k']:>5}/{p['n']:<5}{_pct(p['rate']):>8}  "
            f"[{100 * lo:5.1f}, {100 * hi:5.1f}]  {pos['start']:>6}{pos['middle']:>7}{pos['tail']:>6}"
        )
    if summary["source"] is not None:
        lines.append(f"source rate ({summary['source']}): {_pct(summary['source_rate'])}")
        lines.append(f"mean bystander rate: {_pct(summary['bystander_mean'])}")
    return "\n".join(lines)


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m explore_persona_space.analyze", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("raw_completions", type=Path, help="a raw_completions.json file")
    parser.add_argument("--marker", required=True, help="the marker string, e.g. '[ZLT]'")
    parser.add_argument("--source", default=None, help="source persona (enables bystander mean)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="strict: case-insensitive substring; loose: also whitespace runs collapsed to one space; "
        "spaceless: all whitespace ignored",
    )
    parser.add_argument("--loose", action="store_true", help="the same as --mode loose")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    path = args.raw_completions
    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    records = read_raw_completions(path)
    if not records:
        raise InputError(f"{path}: no records (an empty list); nothing to score")
    try:
        summary = analyze(records, args.marker, loose=args.loose, source=args.source, mode=args.mode)
    except KeyError as exc:  # an unknown --source
        raise InputError(f"--source: {exc.args[0]}") from None
    except ValueError as exc:  # --loose with another --mode
        raise InputError(str(exc)) from None
    sys.stdout.write(to_json(summary) if args.json else format_table(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
