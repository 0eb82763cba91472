"""Experiment tracking with wandb: one run per cell, one summary run per experiment.

``--wandb`` picks the mode (default: ``offline``, or what ``WANDB_MODE`` says). Offline
runs never touch the network: each leaves a run directory under
``<out>/eval_results/<experiment>/wandb/`` that ``wandb sync <dir>`` uploads later, and
:mod:`explore_persona_space.tracking_offline` reads back. ``online`` without credentials
(``WANDB_API_KEY``, ``wandb login``) logs offline instead and says so once; ``disabled``
never imports wandb (importing it costs seconds).

What a cell's run holds (``job_type`` = the cell's role, ``group`` = the experiment):

* config: the resolved scale as ``orchestrate.execute`` saves it, the cell's seeds, and
  per stage its key and config, then the provenance of whatever computed it (``DONE.json``);
* history: each training stage's curves, live from the trainer, as ``train/<stage>/*``
  against ``train/<stage>/step``: the trainer gets a callback rather than
  ``report_to="wandb"``, whose stock callback writes every ``TrainingArguments`` field
  over the run's config and logs every stage's curve to the same ``train/loss``;
* summary: ``stages/<stage>/seconds|reused|key|commit``; ``results/...`` (the final
  stage's numbers: rates with their CIs, judge results); ``leakage/...`` where the cell
  scored a source persona; ``run_result.json`` as a ``run_result`` artifact.

A reused stage shows ``reused: true`` and its original seconds; its curves are not
logged again (they belong to the run that trained it). The figures and ``summary.json``
belong to the experiment, not to a cell: one more run (``job_type="summary"``) carries
them, so a ``--cells`` subset never pins an experiment figure to one cell.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import netrc
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from explore_persona_space.pipeline import Cell, Observer, Stage, StageRecord

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
PROJECT = "explore-persona-space"
FLAT_LIMIT = 2000  # keys per flattened summary: a full-scale summary.json stays well below it
_ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's older spellings of the modes
# The wandb run and stage name a training stage's trainer reports to, while it runs.
_CURVES: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar("eps_curves", default=None)


def default_mode() -> str:
    """``WANDB_MODE`` when it names a mode, else ``offline``."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = _ALIASES.get(env, env)
    return env if env in MODES else "offline"


def has_credentials() -> bool:
    """Whether wandb could authenticate without asking: an API key, an identity token, a netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


@dataclass
class Tracker:
    """The ``--wandb`` choice of one process; makes the observer ``orchestrate.execute`` runs cells with."""

    mode: str = "disabled"
    project: str = PROJECT
    note: str | None = None  # why the mode differs from the one asked for
    started: float = field(default_factory=time.time)  # figures older than this are not this run's
    seconds: float = 0.0  # spent in wandb (import, start, logging, finish): the overhead tracking adds
    runs: int = 0

    @classmethod
    def for_mode(cls, mode: str, project: str | None = None) -> Tracker:
        if mode not in MODES:
            raise ValueError(f"unknown wandb mode {mode!r}; valid: {', '.join(MODES)}")
        note = None
        if mode == "online" and not has_credentials():
            mode, note = "offline", "online asked for, no wandb credentials (WANDB_API_KEY or `wandb login`)"
            log.warning("wandb: %s; logging offline, `wandb sync` uploads the run directories later", note)
        return cls(mode, project or os.environ.get("WANDB_PROJECT") or PROJECT, note)

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    def observer(self, experiment: str, results: Path, config: Mapping[str, Any]) -> Observer:
        return CellRuns(self, experiment, Path(results), dict(config)) if self.enabled else Observer()

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started

    def start(self, results: Path, **init: Any) -> Any | None:
        """A wandb run in ``<results>/wandb/``, or None (logged) when wandb cannot start one."""
        with self.timed():
            results.mkdir(parents=True, exist_ok=True)
            try:
                import wandb

                settings = wandb.Settings(console="off", quiet=True, save_code=False)
                run = wandb.init(
                    mode=self.mode, project=self.project, dir=str(results), settings=settings, **init
                )
            except Exception as exc:  # a tracking failure must never cost the experiment its results
                log.warning(
                    "wandb: no run for %s (%s: %s); not tracked", init.get("name"), type(exc).__name__, exc
                )
                return None
        self.runs += 1
        return run

    def record(self, run: Any | None, results: Path) -> dict[str, Any]:
        """What ``run_result.json`` says about the cell's wandb run."""
        if run is None:
            return {"wandb": {"mode": self.mode, "status": "skipped: wandb could not start a run"}}
        entry = {"mode": self.mode, "project": self.project, "run_id": run.id}
        with contextlib.suppress(ValueError):
            entry["dir"] = str(Path(run.dir).parent.relative_to(results))
        if self.note:
            entry["note"] = self.note
        return {"wandb": entry}

    def log_experiment(
        self, experiment: str, results: Path, figures: Path, summary: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The summary run: summary.json's numbers, this run's figures, summary.json + headline.md."""
        if not self.enabled:
            return None
        run = self.start(
            results,
            name="summary",
            group=experiment,
            job_type="summary",
            config={"experiment": experiment, "tracking": {"mode": self.mode, "note": self.note}},
        )
        if run is None:
            return None
        with self.timed():
            import wandb

            run.summary.update(flatten(summary, "summary"))
            drawn = sorted(p for p in Path(figures).glob("*.png") if p.stat().st_mtime >= self.started - 1)
            if drawn:
                run.log({f"figures/{p.stem}": wandb.Image(str(p), caption=p.stem) for p in drawn})
            files = [results / name for name in ("summary.json", "headline.md") if (results / name).is_file()]
            log_files(run, f"{experiment}-summary", "summary", files)
            run.finish()
        log.info("wandb: summary run %s (%d figures)", run.id, len(drawn))
        log.info(
            "wandb: %d run(s) under %s; %.1f s spent in wandb", self.runs, results / "wandb", self.seconds
        )
        return self.record(run, results)


class CellRuns(Observer):
    """One wandb run per cell, opened as the cell starts, finished once its run_result.json is written."""

    def __init__(self, tracker: Tracker, experiment: str, results: Path, config: dict[str, Any]) -> None:
        self.tracker, self.experiment, self.results, self.config = tracker, experiment, results, config
        self.run: Any | None = None
        self.provenance: dict[str, Any] = {}

    def cell_started(self, cell: Cell) -> None:
        stages = {s.name: {"key": s.key, "config": dict(s.config)} for s in cell.final.chain()}
        config = {
            "experiment": self.experiment,
            "cell": cell.name,
            "role": cell.kind,
            **self.config,
            "seeds": dict(cell.seeds),
            "stages": stages,
        }
        self.provenance = {}
        self.run = self.tracker.start(
            self.results, name=cell.name, group=self.experiment, job_type=cell.kind, config=config
        )

    @contextlib.contextmanager
    def stage(self, cell: Cell, stage: Stage) -> Iterator[None]:
        token = _CURVES.set((self.run, stage.name) if self.run is not None else None)
        try:
            yield
        finally:
            _CURVES.reset(token)

    def stage_finished(self, cell: Cell, record: StageRecord) -> None:
        if self.run is None:
            return
        with self.tracker.timed():
            self._log_stage(record)

    def _log_stage(self, record: StageRecord) -> None:
        self.provenance[record.name] = dict(record.provenance)
        self.run.config.update({"provenance": self.provenance}, allow_val_change=True)
        git = record.provenance.get("git", {})
        prefix = f"stages/{record.name}"
        self.run.summary.update(
            {
                f"{prefix}/seconds": round(record.seconds, 3),
                f"{prefix}/reused": record.reused,
                f"{prefix}/key": record.key,
                f"{prefix}/commit": git.get("commit"),
            }
        )
        if record.reused:
            log.info("wandb: stage %s reused; its curves stay with the run that trained it", record.name)

    def cell_record(self, cell: Cell) -> Mapping[str, Any]:
        return self.tracker.record(self.run, self.results)

    def cell_finished(self, cell: Cell, records: Sequence[StageRecord], run_result: Path) -> None:
        if self.run is None:
            return
        with self.tracker.timed():
            self.run.summary.update(cell_metrics(records[-1].result))
            log_files(self.run, f"{self.experiment}-{cell.name}", "run_result", [run_result])
            self.run.finish()
        self.run = None

    def cell_failed(self, cell: Cell, error: BaseException) -> None:
        if self.run is not None:
            self.run.summary["error"] = f"{type(error).__name__}: {error}"[:500]
            self.run.finish(exit_code=1)
            self.run = None


def log_files(run: Any, name: str, kind: str, files: Sequence[Path]) -> None:
    """Files as an artifact whose bytes live inside the run directory, so ``wandb sync`` finds them.

    wandb stages an artifact's files under the user's data directory unless told the file
    will not change; a copy inside the run directory keeps an offline run self-contained.
    """
    import wandb

    keep = Path(run.dir).parent / "artifact_files" / kind
    keep.mkdir(parents=True, exist_ok=True)
    artifact = wandb.Artifact(_artifact_name(name), type=kind)
    for path in files:
        shutil.copyfile(path, keep / path.name)
        artifact.add_file(str(keep / path.name), name=path.name, policy="immutable")
    run.log_artifact(artifact)


def _artifact_name(name: str) -> str:
    # Artifact names take letters, digits, dashes, underscores and dots.
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def cell_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    """A final stage's numbers for the run summary: ``results/...``, and ``leakage/...`` where defined."""
    out = flatten({k: v for k, v in result.items() if k != "model"}, "results")
    summary = result.get("summary")
    if isinstance(summary, Mapping) and summary.get("source") and "personas" in summary:
        from explore_persona_space.leakage import cell_rates

        rates = cell_rates(summary)
        for who in ("source", "bystander"):
            entry = rates[who]
            out[f"leakage/{who}_rate"] = entry["rate"]
            out[f"leakage/{who}_k"], out[f"leakage/{who}_n"] = entry["k"], entry["n"]
            if entry["wald"]:
                out[f"leakage/{who}_ci_low"], out[f"leakage/{who}_ci_high"] = entry["wald"]
    return out


def flatten(obj: Any, prefix: str, limit: int = FLAT_LIMIT) -> dict[str, Any]:
    """Scalars of a nested result as ``prefix/a/b`` keys; a pair of numbers (a CI) as ``_low``/``_high``.

    Other lists (per-step losses, record lists) are left out: they are curves or raw data,
    which live in the history and the files. ``None`` is left out too (wandb has no null).
    """
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, list | tuple) and len(value) == 2 and all(_is_number(v) for v in value):
            out[f"{key}_low"], out[f"{key}_high"] = value
        elif isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 500):
            out[key] = value

    walk(obj, prefix)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def trainer_callbacks() -> list[Any]:
    """The callback streaming a training stage's curves into its cell's run; none outside a tracked stage."""
    active = _CURVES.get()
    return [] if active is None else [_stage_curves(*active)]


def _stage_curves(run: Any, stage: str) -> Any:
    from transformers import TrainerCallback

    step_key = f"train/{stage}/step"

    class StageCurves(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            run.define_metric(step_key)
            run.define_metric(f"train/{stage}/*", step_metric=step_key)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            row = {f"train/{stage}/{k}": v for k, v in (logs or {}).items() if _is_number(v)}
            if row and state.is_world_process_zero:
                run.log({**row, step_key: state.global_step})

    return StageCurves()
