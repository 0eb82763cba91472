"""Stages and cells: content-addressed, resumable experiment steps.

A :class:`Stage` is one step that produces files (train a LoRA, sample
completions, evaluate). Its directory is ``<root>/stages/<name>-<key>`` where
the key hashes the stage's kind, its resolved config and its parent's key, so
the same inputs always land in the same place and two cells sharing a stage
(the one benign-SFT base under five #247 cells) compute it once.

A stage is finished only when ``DONE.json`` exists; it is written atomically
after everything else. A directory without it is the debris of a killed run
and is wiped before the stage runs again. A file lock per stage keeps two
processes from computing the same stage at once (the second waits, then reuses);
every file a run writes goes to a temporary name of its own and is renamed into
place, so two runs on one ``--out`` never read each other's half-written files.

Every ``DONE.json`` carries the provenance of the process that computed the
stage (:func:`~explore_persona_space.results.stage_provenance`: git commit and
dirty flag, library versions, device, dtype, ``EPS_*`` variables). The
``EPS_*`` variables that change results (:data:`RESULT_ENV`) also enter the
stage key when set, so ``EPS_DTYPE=float32`` never reuses a bf16 stage.

A :class:`Cell` is a chain of stages ending in an evaluation; :func:`run_cells`
runs a list of cells in order and writes each cell's ``run_result.json`` with
per-stage timings, which stages were reused, and the commit that computed each.
An :class:`Observer` (experiment tracking) hears about each cell and stage as it
runs; it sees stages, it never enters their keys.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explore_persona_space.errors import InputError
from explore_persona_space.results import (
    atomic_write_bytes,
    atomic_write_json,
    json_default,
    stage_provenance,
    write_run_result,
)

log = logging.getLogger(__name__)

DONE = "DONE.json"
KEY_CHARS = 16
# Environment variables that change what a stage computes: part of its key when set. (EPS_RESIDENT
# and EPS_CACHE_DIR only change speed and where files live; they are recorded, not keyed.)
RESULT_ENV = ("EPS_DTYPE", "EPS_DATA_DIR", "EPS_EMBEDDED_GGUF")
# The first field of every key's hashed body; kept at "1" so stores written before provenance stay valid.
_KEY_SCHEMA = "1"


def result_env() -> dict[str, str]:
    return {k: os.environ[k] for k in RESULT_ENV if os.environ.get(k)}


def config_hash(obj: Any) -> str:
    """Hash of a JSON-able config, independent of key order and of the Python process."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StageRecord:
    """A finished stage as later stages and the runner see it."""

    name: str
    key: str
    dir: Path
    result: dict[str, Any]
    seconds: float
    reused: bool
    provenance: Mapping[str, Any] = field(default_factory=dict)  # of the run that computed the stage


@dataclass(frozen=True)
class StageContext:
    stage: Stage
    dir: Path
    ancestors: Mapping[str, StageRecord]  # by stage name, nearest first on a clash

    @property
    def parent(self) -> StageRecord | None:
        return self.ancestors.get(self.stage.parent.name) if self.stage.parent else None

    def upstream(self, name: str) -> StageRecord:
        try:
            return self.ancestors[name]
        except KeyError:
            raise KeyError(f"stage {self.stage.name!r} has no upstream stage named {name!r}") from None


StageFn = Callable[[StageContext], Mapping[str, Any]]


@dataclass(frozen=True, eq=False)
class Stage:
    """One step. ``fn`` writes its files into ``ctx.dir`` and returns a JSON-able summary.

    The function itself is not hashed: change what a stage computes by
    changing its config, never silently. ``device`` is where it runs (None:
    the default device); it is recorded in the provenance, not keyed.
    ``uses_model`` marks a stage that loads a model (train, merge, sample, extract):
    the Ray executor gives it a GPU (or a share of one), other stages CPUs; not keyed.
    """

    name: str
    fn: StageFn = field(repr=False)
    config: Mapping[str, Any] = field(default_factory=dict)
    parent: Stage | None = None
    estimate: str = ""  # human-readable size of the work, for --dry-run
    device: str | None = None
    uses_model: bool = False

    @property
    def key(self) -> str:
        parent_key = self.parent.key if self.parent else None
        body: dict[str, Any] = {
            "name": self.name,
            "version": _KEY_SCHEMA,
            "config": self.config,
            "parent": parent_key,
        }
        if env := result_env():
            body["env"] = env
        return config_hash(body)[:KEY_CHARS]

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.key}"

    def chain(self) -> list[Stage]:
        out, node = [], self
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


@dataclass(frozen=True)
class Cell:
    name: str
    final: Stage
    publish: tuple[str, ...] = ()  # files copied into the cell's dir, from the last stage that wrote each
    seeds: Mapping[str, int] = field(default_factory=dict)
    role: str | None = None  # what kind of cell (B0, BS, Z, ...); default: the name up to its first "_"

    @property
    def kind(self) -> str:
        return self.role or self.name.split("_", 1)[0]


class Observer:
    """What the runner tells experiment tracking; every hook does nothing unless overridden.

    ``stage`` wraps the stage's run (a training stage's trainer runs inside it);
    ``cell_finished`` returns fields for the cell's ``run_result.json``.
    """

    def cell_started(self, cell: Cell) -> None:
        pass

    @contextlib.contextmanager
    def stage(self, cell: Cell, stage: Stage) -> Iterator[None]:
        yield

    def stage_finished(self, cell: Cell, record: StageRecord) -> None:
        pass

    def cell_record(self, cell: Cell) -> Mapping[str, Any]:
        return {}

    def cell_finished(self, cell: Cell, records: Sequence[StageRecord], run_result: Path) -> None:
        pass

    def cell_failed(self, cell: Cell, error: BaseException) -> None:
        pass


def stage_dir(root: Path, stage: Stage) -> Path:
    return Path(root) / "stages" / stage.dirname


def is_done(root: Path, stage: Stage) -> bool:
    return (stage_dir(root, stage) / DONE).is_file()


def _read_done(path: Path, stage: Stage) -> StageRecord:
    """The finished stage's record; a damaged one is an error naming it, never silently recomputed.

    A kill cannot truncate ``DONE.json`` (it is written atomically), so a broken one was edited
    or damaged by hand: the stage's files may be fine and hours old, so the run stops and says
    how to recompute it rather than deleting them.
    """
    done_file = path / DONE
    fix = f"restore it, or delete {path} to recompute the stage"
    try:
        done = json.loads(done_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"{done_file}:{exc.lineno}"
        raise InputError(f"{where}: stage record is not valid JSON ({exc.msg}); {fix}") from None
    if not isinstance(done, dict):
        raise InputError(f"{done_file}: stage record is a {type(done).__name__}, not an object; {fix}")
    for name, types in (("result", dict), ("seconds", (int, float))):
        if not isinstance(done.get(name), types) or isinstance(done.get(name), bool):
            raise InputError(f"{done_file}: stage record field {name!r} is missing or mistyped; {fix}")
    prov = done.get("provenance") or {"git": {"commit": None, "dirty": None}, "note": "before provenance"}
    return StageRecord(stage.name, stage.key, path, done["result"], done["seconds"], True, prov)


@contextlib.contextmanager
def _locked(path: Path, what: str = "") -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: a second process running the same stage waits, then reuses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:  # released by the kernel if this process dies, so a killed run never leaves it held
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is computing it (%s); waiting for it", what or path.name, path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_stage(root: Path, stage: Stage, ancestors: Mapping[str, StageRecord]) -> StageRecord:
    """Reuse the stage if finished, otherwise (re)compute it from a clean directory."""
    path = stage_dir(root, stage)
    with _locked(path.with_name(path.name + ".lock"), f"stage {stage.name}"):
        if (path / DONE).is_file():
            log.info("stage %s reused (%s)", stage.name, path.name)
            return _read_done(path, stage)
        if path.exists():
            log.warning("stage %s: removing an unfinished directory from an earlier run", stage.name)
            shutil.rmtree(path)
        path.mkdir(parents=True)
        atomic_write_json(
            path / "config.json", {"name": stage.name, "key": stage.key, "config": stage.config}
        )
        log.info("stage %s started (%s)", stage.name, path.name)
        started = time.perf_counter()
        result = dict(stage.fn(StageContext(stage, path, ancestors)))
        seconds = time.perf_counter() - started
        prov = stage_provenance(stage.device, result_env())
        atomic_write_json(path / DONE, {"result": result, "seconds": seconds, "provenance": prov})
        log.info("stage %s finished in %.1f s", stage.name, seconds)
        plain = json.loads(json.dumps(result, default=json_default))
        return StageRecord(stage.name, stage.key, path, plain, seconds, False, prov)


def run_chain(root: Path, final: Stage, observer: Observer | None = None, cell: Cell | None = None):
    """Every stage of ``final``'s chain, reused or computed, in order."""
    observer = observer or Observer()
    records: list[StageRecord] = []
    ancestors: dict[str, StageRecord] = {}
    for stage in final.chain():
        with observer.stage(cell, stage):
            rec = run_stage(root, stage, ancestors)
        observer.stage_finished(cell, rec)
        records.append(rec)
        ancestors[stage.name] = rec
    return records


@dataclass(frozen=True)
class PlanRow:
    cell: str
    stage: str
    key: str
    done: bool
    estimate: str


def plan(root: Path, cells: Sequence[Cell]) -> list[PlanRow]:
    return [
        PlanRow(cell.name, s.name, s.key, is_done(root, s), s.estimate)
        for cell in cells
        for s in cell.final.chain()
    ]


def format_plan(rows: Sequence[PlanRow], also: Mapping[str, str] | None = None) -> str:
    """One line per cell x stage; ``also`` maps a stage key to where else it is planned (appended)."""
    seen: set[str] = set()
    also = also or {}
    lines = [f"{'cell':<22} {'stage':<16} {'key':<17} {'status':<8} work"]
    for r in rows:
        status = "done" if r.done else ("shared" if r.key in seen else "to run")
        seen.add(r.key)
        extra = f"  [also in {also[r.key]}]" if r.key in also else ""
        lines.append(f"{r.cell:<22} {r.stage:<16} {r.key:<17} {status:<8} {r.estimate}{extra}")
    todo = {r.key for r in rows if not r.done}
    lines.append(f"{len(todo)} distinct stage(s) to run, {len({r.key for r in rows}) - len(todo)} done")
    return "\n".join(lines)


def run_cells(
    root: Path,
    cells: Sequence[Cell],
    *,
    out: Path | None = None,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    observer: Observer | None = None,
    chains: Mapping[str, Sequence[StageRecord]] | None = None,
) -> dict[str, list[StageRecord]]:
    """Run cells in order; write ``<out>/<cell>/run_result.json`` and publish the final stage's files.

    ``chains`` gives each cell's stage records computed elsewhere (the Ray executor's): the
    cells' files are written from them and the observer hears each stage as finished.
    """
    from tqdm.auto import tqdm

    out = Path(out) if out is not None else Path(root)
    observer = observer or Observer()
    done: dict[str, list[StageRecord]] = {}
    for cell in tqdm(cells, desc="cells", unit="cell", disable=not progress):
        observer.cell_started(cell)
        try:
            if chains is None:
                records = run_chain(root, cell.final, observer, cell)
            else:
                records = list(chains[cell.name])
                for rec in records:
                    observer.stage_finished(cell, rec)
            path = _write_cell(out / cell.name, cell, records, config, observer.cell_record(cell))
        except BaseException as exc:
            observer.cell_failed(cell, exc)
            raise
        observer.cell_finished(cell, records, path)
        done[cell.name] = records
    return done


def _write_cell(
    cell_dir: Path,
    cell: Cell,
    records: Sequence[StageRecord],
    config: Mapping[str, Any] | None,
    tracking: Mapping[str, Any],
) -> Path:
    cell_dir.mkdir(parents=True, exist_ok=True)
    for name in cell.publish:  # a temporary name of its own: two runs may publish the same cell at once
        atomic_write_bytes(cell_dir / name, _published(records, name).read_bytes())
    write_run_result(
        cell_dir / "run_result.json",
        config={
            "experiment": dict(config or {}),
            "stages": {s.name: s.config for s in cell.final.chain()},
        },
        seeds=cell.seeds,
        results=records[-1].result,
        timings={r.name: r.seconds for r in records},
        extra={
            "stages": [_stage_summary(r) for r in records],
            **({"tracking": dict(tracking)} if tracking else {}),
        },
    )
    return cell_dir / "run_result.json"


def _published(records: Sequence[StageRecord], name: str) -> Path:
    """The file from the latest stage that wrote it (a judge stage after an eval publishes the eval's)."""
    for rec in reversed(records):
        if (rec.dir / name).is_file():
            return rec.dir / name
    raise FileNotFoundError(f"no stage of the chain wrote {name!r}: {[r.name for r in records]}")


def _stage_summary(rec: StageRecord) -> dict[str, Any]:
    git = rec.provenance.get("git", {})
    return {
        "name": rec.name,
        "key": rec.key,
        "dir": rec.dir.name,
        "reused": rec.reused,
        "seconds": round(rec.seconds, 3),
        "commit": git.get("commit"),  # the code that computed this stage, not this run's
        "dirty": git.get("dirty"),
        "computed_utc": rec.provenance.get("created_utc"),
    }
