"""What every ``scripts/run_issueNNN_*.py`` shares: its CLI, its paths, running or planning cells.

An orchestrator is a list of cells plus figures and a headline table. This
module holds the parts that would otherwise be copied into each script:

* :func:`parser` - the common flags (``--scale``, ``--model``, ``--out``,
  ``--cells``, ``--dry-run``, ``--device``, ``--backend``); unknown flags are
  an error, as DESIGN.md asks;
* :class:`ExperimentPaths` - ``<out>/eval_results/<exp>/`` (per-cell outputs,
  ``summary.json``, ``headline.md``), its ``stages/`` store (content-addressed
  stage directories, git-ignored) and ``<out>/figures/<exp>/``;
* :func:`plan_text` - what ``--dry-run`` prints (which stages are done, shared
  or still to run, and how big each is); :func:`execute` runs the cells;
* :func:`markdown_table`, :func:`rate_text`, :func:`write_outputs` - the headline
  table the script prints at the end, saved as markdown next to ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explore_persona_space.generate import BACKENDS
from explore_persona_space.models import DEFAULT_MODEL
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.pipeline import Cell, StageRecord, format_plan, plan, run_cells
from explore_persona_space.results import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SCALES = ("smoke", "full")


def parser(
    doc: str | None, cell_names: Sequence[str], scales: Sequence[str] = SCALES
) -> argparse.ArgumentParser:
    """The shared flags; a script adds its own (e.g. the judge flags) before parsing."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=scales, default=scales[0], help="which size of the protocol to run")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model alias, hub id or local path (default {DEFAULT_MODEL}, the embedded model)",
    )
    p.add_argument("--out", type=Path, default=REPO_ROOT, help="root for eval_results/ and figures/")
    p.add_argument(
        "--cells",
        nargs="+",
        metavar="CELL",
        type=_cell_name(cell_names),
        help=f"run only these cells (default: all): {', '.join(cell_names)}",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, done or to run) and exit")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="generation backend")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override fields of the chosen scale (type-checked), e.g. --set couple_lr=3e-4 eval_samples=2",
    )
    return p


def resolve_scale(p: argparse.ArgumentParser, args: argparse.Namespace, scales: Mapping[str, Any]) -> Any:
    """The chosen scale's frozen dataclass with ``--set`` overrides applied; a bad override exits 2."""
    scale = scales[args.scale]
    try:
        return apply_overrides(scale, args.overrides)
    except ValueError as exc:
        p.error(str(exc))


def apply_overrides(scale: Any, items: Sequence[str]) -> Any:
    """``KEY=VALUE`` strings onto a dataclass; each value is parsed as the field's current type."""
    names = [f.name for f in dataclasses.fields(scale)]
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in names:
            raise ValueError(f"--set: unknown key {key!r}; valid: {', '.join(names)}")
        current = getattr(scale, key)
        try:
            changes[key] = _parse_as(current, raw)
        except ValueError:
            raise ValueError(f"--set {key}: {raw!r} is not a {type(current).__name__}") from None
    return dataclasses.replace(scale, **changes)


def _parse_as(current: Any, raw: str) -> Any:
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(raw)
        return raw.lower() in ("true", "1")
    if isinstance(current, int | float | str):
        return type(current)(raw)
    raise ValueError(f"cannot override a field of type {type(current).__name__}")


def _cell_name(valid: Sequence[str]):
    def check(value: str) -> str:
        if value not in valid:
            raise argparse.ArgumentTypeError(f"unknown cell {value!r}; valid: {', '.join(valid)}")
        return value

    return check


def select(cells: Sequence[Cell], names: Iterable[str] | None) -> list[Cell]:
    """The cells named (in the script's order), or all of them."""
    if not names:
        return list(cells)
    wanted = set(names)
    return [c for c in cells if c.name in wanted]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass(frozen=True)
class ExperimentPaths:
    name: str
    out: Path

    @property
    def results(self) -> Path:
        return self.out / "eval_results" / self.name

    @property
    def stages(self) -> Path:
        """Where the content-addressed stage directories live (``run_stage`` adds ``stages/``)."""
        return self.results

    @property
    def figures(self) -> Path:
        return self.out / "figures" / self.name

    def cell(self, name: str) -> Path:
        return self.results / name


def plan_text(paths: ExperimentPaths, cells: Sequence[Cell]) -> str:
    """What ``--dry-run`` shows: every cell's stages, which are done, shared or to run, and their size."""
    return f"# {paths.name}: stages under {paths.stages / 'stages'}\n" + format_plan(
        plan(paths.stages, cells)
    )


def execute(
    paths: ExperimentPaths, cells: Sequence[Cell], *, config: Mapping[str, Any], progress: bool = True
) -> dict[str, list[StageRecord]]:
    """Run the cells in order, reusing every finished stage; one run_result.json per cell."""
    return run_cells(paths.stages, cells, out=paths.results, config=config, progress=progress)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def rate_text(k: int | None, n: int | None, digits: int = 1) -> str:
    """``"99.3% (278/280)"``: the write-ups' way of giving a rate with its counts."""
    if k is None or not n:
        return "n/a"
    return f"{100 * k / n:.{digits}f}% ({k:,}/{n:,})"


def write_outputs(paths: ExperimentPaths, summary: Mapping[str, Any], headline: str, title: str) -> str:
    """Write ``summary.json`` and ``headline.md``; return the text the script prints last."""
    paths.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths.results / "summary.json", summary)
    text = f"# {title}\n\n{headline}\n"
    atomic_write_text(paths.results / "headline.md", text)
    log.info("wrote %s and %s", paths.results / "summary.json", paths.results / "headline.md")
    return text
