"""Ray as the executor: the stage DAG of every selected cell as Ray tasks, over GPUs and nodes.

Why: the local executor runs stages one after another in one process, so a pod's
other GPUs sit idle, and one embedded-model cell keeps an H100 busy 13% of the
time (BENCHMARKS.md: a 135M model is launch-bound). Ray schedules the same stages
as tasks: independent stages at once, several small-model stages on one GPU.

How it maps onto the pipeline:

* every distinct stage (by key) of the selected cells is one task; a stage that
  several cells share is one task, and a task takes its parent's task result as an
  argument, so it starts after its parent and independent stages run concurrently;
* a stage that loads a model (:attr:`Stage.uses_model`) asks for ``model_gpus``
  GPUs on a cluster that has GPUs (a whole one for a full-size model, the scale's
  share for the embedded model; Ray's default for GPU tasks, a fresh worker process
  per task, gives the card's memory back afterwards), every other stage one CPU;
* workers run the same stage function on the same content-addressed store
  (:func:`pipeline.run_stage`: a lock per stage, debris wiped, ``DONE.json``
  last), so the store stays the source of truth: a worker that dies leaves its
  stage unfinished, and Ray's retry or the next run recomputes it. On several
  nodes the store must be on a filesystem every node mounts at the same path;
  each task checks a token file the driver wrote there and fails saying so;
* the driver prints one line per finished stage (stage, cells, node, GPU ids,
  seconds) above a progress bar, then writes each cell's ``run_result.json`` in
  the script's order as the local executor does: a stage that cells share is
  recorded as computed by the first of them and reused by the others.

Ray is an optional extra (``uv sync --extra ray``) and is imported only here, only
when ``--executor ray`` is asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from explore_persona_space.models import EMBEDDED_ALIAS
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.pipeline import (
    RESULT_ENV,
    Cell,
    Observer,
    Stage,
    StageRecord,
    run_cells,
    run_stage,
)

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
INSTALL_HINT = "--executor ray needs Ray, an optional extra: uv sync --extra ray"
# GPU share of a model stage on the embedded model when the scale names none: eight stages per GPU.
DEFAULT_EMBEDDED_GPU_SHARE = 0.125
MAX_RETRIES = 2  # a task whose worker died is run again (its unfinished stage directory is wiped first)
TOKEN_FILE = ".ray-store-{}"
UV_HOOK = "RAY_ENABLE_UV_RUN_RUNTIME_ENV"  # Ray's `uv run` hook: workers re-run `uv run`, without the extra


@dataclass(frozen=True)
class Executor:
    """How ``orchestrate.execute`` runs cells: ``local`` (in order, in this process) or ``ray``."""

    kind: str = "local"
    address: str | None = None  # None: start a local Ray cluster; "auto": join the running one
    model_gpus: float = 1.0  # GPUs a model stage asks for on a cluster with GPUs


def available() -> bool:
    return importlib.util.find_spec("ray") is not None


def model_gpus(model: str, scale: Any) -> float:
    """A whole GPU for a full-size model; for the embedded model the scale's ``embedded_gpu_share``."""
    if model != EMBEDDED_ALIAS:
        return 1.0
    share = float(getattr(scale, "embedded_gpu_share", DEFAULT_EMBEDDED_GPU_SHARE))
    if not 0 < share <= 1:
        raise ValueError(f"embedded_gpu_share must be in (0, 1], got {share}")
    return share


def stage_resources(stage: Stage, model_gpus: float, cluster_gpus: float) -> dict[str, float]:
    """What a stage's task asks Ray for: GPUs for a model stage (when the cluster has any), else a CPU."""
    on_gpu = stage.device is None or stage.device.startswith("cuda")
    if stage.uses_model and on_gpu and cluster_gpus > 0:
        return {"num_cpus": 1, "num_gpus": model_gpus}
    return {"num_cpus": 1, "num_gpus": 0}


@dataclass(frozen=True)
class StageGraph:
    stages: dict[str, Stage]  # by key, every parent before its children
    cells: dict[str, list[str]]  # key -> the cells whose chain holds the stage, in the script's order


def stage_graph(cells: Sequence[Cell]) -> StageGraph:
    stages: dict[str, Stage] = {}
    users: dict[str, list[str]] = {}
    for cell in cells:
        for stage in cell.final.chain():
            key = stage.key
            stages.setdefault(key, stage)
            users.setdefault(key, []).append(cell.name)
    return StageGraph(stages, users)


def cell_chains(cells: Sequence[Cell], computed: Mapping[str, StageRecord]) -> dict[str, list[StageRecord]]:
    """Each cell's records; a stage shared with an earlier cell is marked reused, as a local run marks it."""
    claimed: set[str] = set()
    chains: dict[str, list[StageRecord]] = {}
    for cell in cells:
        records = []
        for stage in cell.final.chain():
            rec = computed[stage.key]
            records.append(replace(rec, reused=True) if stage.key in claimed else rec)
            claimed.add(stage.key)
        chains[cell.name] = records
    return chains


class StoreNotVisible(RuntimeError):
    pass


@dataclass(frozen=True)
class TaskResult:
    chain: list[StageRecord]  # the stage's ancestors, then the stage
    node: str
    gpus: list[str]
    seconds: float  # in the task, waiting for another process's lock on the stage included


def _stage_task(store: str, token: str, stage: Stage, key: str, parent: TaskResult | None) -> TaskResult:
    """One stage in a Ray worker: the same :func:`run_stage` the local executor calls, on the same store."""
    import ray

    node = ray.util.get_node_ip_address()
    root = Path(store)
    if not (root / "stages" / TOKEN_FILE.format(token)).is_file():
        raise StoreNotVisible(
            f"the stage store {root / 'stages'} is not visible from Ray node {node}: with several nodes, "
            "put --out (eval_results/stages) on a filesystem every node mounts at the same path"
        )
    if stage.key != key:
        raise RuntimeError(
            f"stage {stage.name!r} has key {stage.key} on node {node} but {key} on the driver: the variables "
            f"that key stages ({', '.join(RESULT_ENV)}) differ there; set them alike on every node"
        )
    chain = list(parent.chain) if parent is not None else []
    started = time.perf_counter()
    record = run_stage(root, stage, {r.name: r for r in chain})
    gpus = [str(g) for g in ray.get_gpu_ids()]
    return TaskResult([*chain, record], node, gpus, time.perf_counter() - started)


def connect(address: str | None = None, **init: Any) -> str | None:
    """Start a local Ray cluster (``address`` None) or join one; return the dashboard's URL if one runs.

    A cluster this process already joined is used as it is. Under ``uv run``, Ray would
    start its workers through ``uv run`` again, which re-syncs the environment without
    the extra; its workers use this interpreter instead. The ``EPS_*`` variables go to
    every worker (those in ``RESULT_ENV`` key the stages).
    """
    os.environ.setdefault(UV_HOOK, "0")
    import ray
    from ray._private import ray_constants

    if os.environ[UV_HOOK] == "0":  # read when ray is imported: ray may have been imported before us
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    if ray.is_initialized():
        return None
    env = {k: v for k, v in os.environ.items() if k.startswith("EPS_")}
    context = ray.init(address=address, runtime_env={"env_vars": env} if env else None, **init)
    url = getattr(context, "dashboard_url", None)
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def progress_line(cells: Sequence[str], result: TaskResult) -> str:
    rec = result.chain[-1]
    where = f"{result.node} GPU {','.join(result.gpus)}" if result.gpus else f"{result.node} CPU"
    took = f"reused ({rec.seconds:.1f} s when computed)" if rec.reused else f"{rec.seconds:.1f} s"
    return f"stage {rec.name} [{', '.join(cells)}] on {where}: {took}"


def _pickle_scripts_by_value(stages: Sequence[Stage]) -> None:
    """Stage functions of a script or a test (not the package) travel by value: workers can't import them."""
    from ray import cloudpickle

    for stage in stages:
        module = sys.modules.get(getattr(stage.fn, "__module__", "") or "")
        path = getattr(module, "__file__", None)
        inside = path is not None and Path(path).resolve().is_relative_to(REPO_ROOT)
        name = module.__name__ if module is not None else "__main__"
        if inside and name != "__main__" and not name.startswith("explore_persona_space"):
            cloudpickle.register_pickle_by_value(module)


def _submit(graph: StageGraph, store: Path, token: str, executor: Executor) -> dict[str, Any]:
    import ray

    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    _pickle_scripts_by_value(list(graph.stages.values()))
    on_cpu = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_stage_task)
    # Ray's own default for GPU tasks (max_calls=1): the worker exits after the task, so a model kept
    # resident in it leaves the card, and the next task on that GPU starts from a clean process.
    on_gpu = ray.remote(num_gpus=executor.model_gpus, max_calls=1, max_retries=MAX_RETRIES)(_stage_task)
    refs: dict[str, Any] = {}
    for key, stage in graph.stages.items():
        parent = refs[stage.parent.key] if stage.parent is not None else None
        wants = stage_resources(stage, executor.model_gpus, cluster_gpus)
        task = on_gpu if wants["num_gpus"] else on_cpu
        refs[key] = task.options(name=f"{stage.name}-{key[:8]}").remote(str(store), token, stage, key, parent)
    return refs


def _gather(graph: StageGraph, refs: Mapping[str, Any], progress: bool):
    """Wait for every task; one line per finished stage above a bar. Returns (records, errors) by key."""
    import ray
    from tqdm.auto import tqdm

    pending = {ref: key for key, ref in refs.items()}
    computed: dict[str, StageRecord] = {}
    failed: dict[str, BaseException] = {}
    with tqdm(total=len(refs), desc="stages", unit="stage", disable=not progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                key = pending.pop(ref)
                cells = graph.cells[key]
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    failed[key] = exc
                    first = str(getattr(exc, "cause", None) or exc).strip().splitlines()[-1:]
                    line = f"stage {graph.stages[key].name} [{', '.join(cells)}] failed: {' '.join(first)}"
                else:
                    computed[key] = result.chain[-1]
                    line = progress_line(cells, result)
                if progress:
                    bar.write(line)
                else:
                    log.info(line)
                bar.update()
    return computed, failed


def run_cells_ray(
    root: Path,
    cells: Sequence[Cell],
    executor: Executor,
    *,
    out: Path,
    config: Mapping[str, Any],
    progress: bool = True,
    observer: Observer | None = None,
) -> dict[str, list[StageRecord]]:
    """The cells' stages as Ray tasks, then each cell's files as :func:`pipeline.run_cells` writes them.

    Cells whose stages all finished are written even when another cell failed; then the
    first failure is raised (its stages stay unfinished in the store, recomputed next run).
    """
    observer = observer or Observer()
    dashboard = connect(executor.address)
    if dashboard:
        log.info("Ray dashboard: %s", dashboard)
    graph = stage_graph(cells)
    token = uuid.uuid4().hex
    mark = Path(root) / "stages" / TOKEN_FILE.format(token)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text("written by the Ray driver: a worker that cannot read it cannot see the store\n")
    try:
        computed, failed = _gather(graph, _submit(graph, Path(root), token, executor), progress)
    finally:
        mark.unlink(missing_ok=True)
    whole = [c for c in cells if all(s.key in computed for s in c.final.chain())]
    chains = cell_chains(whole, computed)
    done = run_cells(root, whole, out=out, config=config, progress=False, observer=observer, chains=chains)
    if failed:
        key, error = next(iter(failed.items()))
        cause = getattr(error, "cause", None) or error
        for cell in cells:
            if cell.name not in done:
                observer.cell_failed(cell, cause)
        stage = graph.stages[key]
        raise RuntimeError(
            f"{len(failed)} stage task(s) failed, first {stage.name!r} of {graph.cells[key]}: {cause}"
        ) from cause
    return done
