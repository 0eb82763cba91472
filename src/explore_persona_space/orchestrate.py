"""What every ``scripts/run_issueNNN_*.py`` shares: its CLI, its paths, running or planning cells.

An orchestrator is a list of cells plus figures and a headline table. This
module holds the parts that would otherwise be copied into each script:

* :func:`parser` / :func:`cli` - the common flags (``--scale``, ``--model``, ``--out``,
  ``--cells``, ``--dry-run``, ``--device``, ``--backend``, ``--deterministic``,
  ``--vllm-memory``, ``--seed``, ``--set``, ``--wandb``, ``--push-to-hub``, ``--executor``,
  ``--ray-address``); unknown flags are an error, as DESIGN.md asks; :func:`resolve_scale`
  applies them to the scale;
* :class:`ExperimentPaths` (made by :func:`experiment_paths`) - ``<out>/eval_results/<exp>/``
  (per-cell outputs, ``summary.json``, ``headline.md``, offline wandb runs under ``wandb/``),
  the ``<out>/eval_results/stages/`` store (content-addressed, shared by every experiment,
  git-ignored) and ``<out>/figures/<exp>/``; it carries the run's tracker and Hub target;
* :func:`plan_text` - what ``--dry-run`` prints (which stages are done, shared
  or still to run, how big each is, which other experiment's plan holds the same
  stage - plans are indexed under ``<store>/plans/`` - and with ``--push-to-hub``
  what would be uploaded); :func:`execute` runs the cells, one wandb run each, in this process
  or (``--executor ray``) as Ray tasks (:mod:`explore_persona_space.ray_executor`);
* :func:`cli_errors` (from :mod:`explore_persona_space.errors`) wraps each script's ``main``: bad
  input ends in one ``error:`` line and exit status 2, never a traceback;
* :func:`markdown_table`, :func:`rate_text`, :func:`write_outputs` - the headline
  table the script prints at the end, saved as markdown next to ``summary.json``;
  then the summary run (figures) and the Hub push.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explore_persona_space import hub, ray_executor, tracking
from explore_persona_space.config import ConfigError, apply_overrides, with_seed
from explore_persona_space.errors import InputError
from explore_persona_space.errors import cli_errors as cli_errors  # each script wraps its main in it
from explore_persona_space.generate import BACKENDS
from explore_persona_space.generate_vllm import VLLMOptions
from explore_persona_space.models import EMBEDDED_ALIAS, FULL_SCALE_MODEL, canonical_model
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.pipeline import Cell, PlanRow, StageRecord, format_plan, plan, run_cells
from explore_persona_space.results import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def parser(doc: str | None, cell_names: Sequence[str], scales: Sequence[str]) -> argparse.ArgumentParser:
    """The shared flags; a script adds its own (e.g. the judge flags) before parsing."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=scales, default=scales[0], help="which size of the protocol to run")
    p.add_argument(
        "--model",
        default=None,
        help=f"model alias, hub id or local path (default: the scale's model - {FULL_SCALE_MODEL} at "
        f"full scale, {EMBEDDED_ALIAS} (the embedded model) otherwise)",
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
        "--deterministic",
        action="store_true",
        help="vLLM backend: batch-invariant mode, so a rerun gives the same completions (slower); "
        "the transformers backend repeats exactly anyway",
    )
    p.add_argument(
        "--vllm-memory",
        type=float,
        default=None,
        metavar="FRACTION",
        help="vLLM backend: share of the GPU's memory the engine takes (default: sized from the memory "
        "free once this process has released its models)",
    )
    p.add_argument("--seed", type=int, default=None, help="the one seed every other seed derives from")
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override fields of the chosen scale, typed by annotation; dotted keys reach nested fields; "
        "may be given more than once, e.g. --set couple_lr=3e-4 --set train.epochs=2.5",
    )
    p.add_argument(
        "--wandb",
        choices=tracking.MODES,
        default=tracking.default_mode(),
        help="experiment tracking, one wandb run per cell (default: offline, or WANDB_MODE): offline writes "
        "run directories under eval_results/<exp>/wandb/ for `wandb sync`; online needs WANDB_API_KEY",
    )
    p.add_argument(
        "--push-to-hub",
        type=hub.repo_id,
        default=os.environ.get(hub.ENV_REPO) or None,
        metavar="ORG/REPO",
        help=f"after the run, upload what changed (adapters + model cards, run_result.json, raw completions, "
        f"summary.json, figures) under <experiment>/ (default: ${hub.ENV_REPO}; needs HF_TOKEN)",
    )
    p.add_argument(
        "--executor",
        choices=ray_executor.EXECUTORS,
        default="local",
        help="local: stages one after another in this process; ray: the stages of all selected cells as "
        "Ray tasks (shared stages once, independent ones at once, GPUs by stage kind); needs the ray extra",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="with --executor ray: the cluster to join ('auto': the one `ray start` runs on this node, or "
        "HOST:PORT); default: start a local cluster",
    )
    return p


@dataclass(frozen=True)
class Resolved:
    """The scale a run uses, after ``--set``, ``--seed`` and ``--model``; saved next to every result."""

    name: str  # smoke | full | test | ...
    scale: Any  # the experiment's frozen Scale dataclass
    model_note: str | None = None  # set when the model does not match the scale

    @property
    def model(self) -> str:
        return self.scale.model

    @property
    def seed(self) -> int:
        return self.scale.seed

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.name,
            "scale_config": dataclasses.asdict(self.scale),
            "model": self.model,
            "seed": self.seed,
            "model_note": self.model_note,
        }


def resolve_scale(
    p: argparse.ArgumentParser, args: argparse.Namespace, scales: Mapping[str, Any]
) -> Resolved:
    """The chosen scale with ``--set``, ``--seed`` and ``--model`` applied; a bad override exits 2.

    The model belongs to the scale (``Scale.model``); ``--model`` replaces it. A
    full-scale run on the embedded model, or a smaller scale on another model,
    is allowed but warned about on one line and recorded as ``model_note``.
    """
    try:
        scale = with_seed(apply_overrides(scales[args.scale], args.overrides), args.seed)
    except ConfigError as exc:
        p.error(str(exc))
    if args.model is not None:
        scale = dataclasses.replace(scale, model=args.model)
    scale = dataclasses.replace(scale, model=canonical_model(scale.model))
    note = model_mismatch(args.scale, scale.model)
    if note:
        log.warning(note)
    return Resolved(args.scale, scale, note)


def model_mismatch(scale_name: str, model: str) -> str | None:
    """One line when the protocol size and the model disagree (full on 135M, smoke on a 7B), else None."""
    embedded = model == EMBEDDED_ALIAS
    if scale_name == "full" and embedded:
        return f"model mismatch: the full protocol on the embedded {EMBEDDED_ALIAS}, not {FULL_SCALE_MODEL}"
    if scale_name != "full" and not embedded:
        return f"model mismatch: the {scale_name} scale is sized for {EMBEDDED_ALIAS}, running on {model}"
    return None


def cli(
    doc: str | None,
    cell_names: Sequence[str],
    scales: Mapping[str, Any],
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], Any] | None = None,
) -> tuple[argparse.Namespace, Resolved]:
    """Parse a script's command line (``extra`` adds its own flags) and resolve its scale; logging on."""
    p = parser(doc, cell_names, scales=tuple(scales))
    if extra is not None:
        p = extra(p) or p
    args = p.parse_args(argv)
    if args.executor == "ray" and not ray_executor.available():
        p.exit(2, f"{p.prog}: error: {ray_executor.INSTALL_HINT}\n")
    if args.ray_address is not None and args.executor != "ray":
        p.error("--ray-address needs --executor ray")
    setup_logging()
    args.out = args.out.resolve()
    check_writable(args.out)
    try:
        vllm = VLLMOptions(gpu_memory_utilization=args.vllm_memory, deterministic=args.deterministic)
    except ValueError as exc:
        p.error(f"--vllm-memory: {exc}")
    # What every generation stage of the script takes: generate_stage(..., **args.gen).
    args.gen = {"backend": args.backend, "device": args.device, "vllm": vllm}
    args.tracker = tracking.Tracker.for_mode(args.wandb)
    run = resolve_scale(p, args, scales)
    try:
        gpus = ray_executor.model_gpus(run.model, run.scale)
    except ValueError as exc:
        p.error(str(exc))
    args.executor_options = ray_executor.Executor(args.executor, args.ray_address, gpus)
    return args, run


def check_writable(out: Path) -> None:
    """Fail at once, on one line, when ``--out`` cannot hold results (read-only, not a directory, no access).

    Every run and dry run writes under ``<out>/eval_results/``; finding that out after an hour
    of training, when the first stage record is written, would lose the hour.
    """
    try:
        (out / "eval_results").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "eval_results" / f".write-check-{os.getpid()}", "")
        (out / "eval_results" / f".write-check-{os.getpid()}").unlink()
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write results there ({exc.strerror or exc})") from None


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
    """``<out>/eval_results/<name>/``, ``<out>/figures/<name>/`` and the stage store all experiments share.

    It also carries where else the results go: the wandb ``tracker`` (disabled unless given)
    and the ``hub_repo`` repository to push to (none unless given), and how the cells run
    (``executor``: local unless given); :func:`experiment_paths` takes them from the command line.
    """

    name: str
    out: Path
    tracker: tracking.Tracker = field(default_factory=tracking.Tracker, compare=False, repr=False)
    hub_repo: str | None = None
    executor: ray_executor.Executor = field(default_factory=ray_executor.Executor, compare=False)

    @property
    def results(self) -> Path:
        return self.out / "eval_results" / self.name

    @property
    def store(self) -> Path:
        """Root of the content-addressed stage store (the pipeline keeps stages in ``<store>/stages/``).

        One store under ``<out>/eval_results/`` for every experiment: a stage is keyed by what it
        computes, not by who asked, so a stage two experiments share (the #247 benign-SFT base
        that #125 also trains, #261's on-policy data under #354) is computed once.
        """
        return self.out / "eval_results"

    @property
    def figures(self) -> Path:
        return self.out / "figures" / self.name


def experiment_paths(name: str, args: argparse.Namespace) -> ExperimentPaths:
    """The experiment's paths under ``--out``, with the ``--wandb`` tracker and the ``--push-to-hub`` repo."""
    executor = getattr(args, "executor_options", None) or ray_executor.Executor()
    return ExperimentPaths(name, args.out, tracker=args.tracker, hub_repo=args.push_to_hub, executor=executor)


def plan_text(paths: ExperimentPaths, cells: Sequence[Cell], run: Resolved | None = None) -> str:
    """What ``--dry-run`` shows: every cell's stages, which are done, shared or to run, and their size.

    A stage that another experiment's recorded plan (:func:`record_plan`) also holds is
    marked ``[also in <experiment>:<cell>]``: the store computes it once for both.
    With a Hub repository, also what a push would upload now, and which cells the run rewrites.
    """
    head = f"# {paths.name}: stages under {paths.store / 'stages'}"
    if run is not None:
        head += f"\n# {run.name} scale, model {run.model}, seed {run.seed}"
        head += f" ({run.model_note})" if run.model_note else ""
    rows = plan(paths.store, cells)
    also = record_plan(paths, rows, run.name if run is not None else None)
    text = head + "\n" + format_plan(rows, also)
    if paths.hub_repo:
        # every selected cell's run_result.json is rewritten by the run; its adapters are those it trains
        pending = {c.name: [s.name for s in c.final.chain() if "train" in s.config] for c in cells}
        upload = hub.plan(paths.hub_repo, paths.name, paths.results, paths.figures, paths.store)
        text += "\n" + hub.plan_text(upload, pending)
    return text


def record_plan(paths: ExperimentPaths, rows: Sequence[PlanRow], scale: str | None) -> dict[str, str]:
    """Save this experiment's stage keys under ``<store>/plans/``; return the other experiments' matches.

    Every dry run and every run records its plan (a small JSON index, no stage is
    touched), so a later dry run of another experiment can say which of its stages
    are shared - at full scale, before anything has run.
    """
    directory = paths.store / "plans"
    mine = directory / f"{paths.name}-{scale or 'default'}.json"
    atomic_write_json(
        mine, {"experiment": paths.name, "scale": scale, "stages": [dataclasses.asdict(r) for r in rows]}
    )
    found: dict[str, list[str]] = {}
    for other in sorted(directory.glob("*.json")):
        if other == mine:
            continue
        try:
            data = json.loads(other.read_text(encoding="utf-8"))
            for r in data["stages"]:
                where = f"{data['experiment']}:{r['cell']}"
                if where not in found.setdefault(r["key"], []):
                    found[r["key"]].append(where)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable plan index %s (%s)", other, exc)
    wanted = {r.key for r in rows}
    return {key: ", ".join(where) for key, where in found.items() if key in wanted}


def execute(
    paths: ExperimentPaths, cells: Sequence[Cell], *, config: Mapping[str, Any], progress: bool = True
) -> dict[str, list[StageRecord]]:
    """Run the cells, reusing every finished stage; one run_result.json (and wandb run) per cell.

    The local executor runs them in order in this process; ``--executor ray`` runs their
    stages as Ray tasks and writes the same files (a training stage's curves are then not
    streamed to wandb: the trainer runs in a Ray worker).
    """
    record_plan(paths, plan(paths.store, cells), config.get("scale"))
    observer = paths.tracker.observer(paths.name, paths.results, config)
    if paths.executor.kind == "ray":
        return ray_executor.run_cells_ray(
            paths.store, cells, paths.executor, out=paths.results, config=config, progress=progress,
            observer=observer,
        )  # fmt: skip
    return run_cells(
        paths.store, cells, out=paths.results, config=config, progress=progress, observer=observer
    )


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; a ``|`` inside a cell is escaped (``P(B|A)`` would split a column)."""

    def row(values: Iterable[Any]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    lines = [row(headers), "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join([*lines, *(row(r) for r in rows)])


def pct(x: float | None, digits: int = 1) -> str:
    """``"12.5%"``, or ``"n/a"`` for an undefined rate."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def rate_text(k: int | None, n: int | None, digits: int = 1, rate: float | None = None) -> str:
    """``"99.3% (278/280)"``: the write-ups' way of giving a rate with its counts.

    ``rate`` replaces k/n where the shown rate is not the pooled one (a mean of per-persona rates).
    """
    if k is None or not n:
        return "n/a"
    return f"{pct(k / n if rate is None else rate, digits)} ({k:,}/{n:,})"


def write_outputs(paths: ExperimentPaths, summary: Mapping[str, Any], headline: str, title: str) -> str:
    """Write ``summary.json`` and ``headline.md``; return the text the script prints last.

    The experiment is complete here (scripts draw their figures first), so this is also
    where its summary run is logged and, with a Hub repository, where it is pushed.
    """
    paths.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths.results / "summary.json", summary)
    text = f"# {title}\n\n{headline}\n"
    atomic_write_text(paths.results / "headline.md", text)
    log.info("wrote %s and %s", paths.results / "summary.json", paths.results / "headline.md")
    paths.tracker.log_experiment(paths.name, paths.results, paths.figures, summary)
    if paths.hub_repo:
        hub.publish(paths.hub_repo, paths.name, paths.results, paths.figures, paths.store)
    return text
