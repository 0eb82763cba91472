"""``--executor ray``: the stage DAG of the selected cells as Ray tasks, same store, same results."""

import argparse
import json

import pytest
from conftest import load_script

from explore_persona_space import orchestrate, ray_executor
from explore_persona_space.pipeline import Cell, Stage, run_cells
from explore_persona_space.results import read_raw_completions


def _ok(ctx):
    return {"name": ctx.stage.name}


def _cells():
    """Two cells sharing a root stage, each with a model stage and a CPU stage after it."""
    root = Stage("root", _ok, {"n": 1}, uses_model=True)
    a = Stage("score", _ok, {"c": "a"}, parent=Stage("sample", _ok, {"c": "a"}, parent=root, uses_model=True))
    b = Stage("score", _ok, {"c": "b"}, parent=Stage("sample", _ok, {"c": "b"}, parent=root, uses_model=True))
    return [Cell("A", a), Cell("B", b)]


def test_the_graph_holds_each_stage_once_parents_first_with_the_cells_that_share_it():
    cells = _cells()
    graph = ray_executor.stage_graph(cells)
    assert [s.name for s in graph.stages.values()] == ["root", "sample", "score", "sample", "score"]
    root_key = cells[0].final.chain()[0].key
    assert graph.cells[root_key] == ["A", "B"]
    seen = set()
    for key, stage in graph.stages.items():  # every parent is submitted before its children
        assert stage.parent is None or stage.parent.key in seen
        seen.add(key)


def test_a_shared_stage_is_computed_by_the_first_cell_and_reused_by_the_others(tmp_path):
    cells = _cells()
    local = run_cells(tmp_path, cells, progress=False)
    computed = {rec.key: rec for records in local.values() for rec in records if not rec.reused}
    chains = ray_executor.cell_chains(cells, computed)
    assert [[r.reused for r in chain] for chain in chains.values()] == [
        [r.reused for r in chain] for chain in local.values()
    ]
    assert [[r.reused for r in chain] for chain in chains.values()] == [[False] * 3, [True, False, False]]


def test_resources_follow_the_stage_kind_and_the_cluster():
    model, cpu = Stage("gen", _ok, uses_model=True), Stage("judge", _ok)
    assert ray_executor.stage_resources(model, 0.125, cluster_gpus=1) == {"num_cpus": 1, "num_gpus": 0.125}
    assert ray_executor.stage_resources(cpu, 0.125, cluster_gpus=1) == {"num_cpus": 1, "num_gpus": 0}
    # no GPU in the cluster (CI): model stages take a CPU instead of waiting for a GPU forever
    assert ray_executor.stage_resources(model, 1.0, cluster_gpus=0) == {"num_cpus": 1, "num_gpus": 0}
    pinned = Stage("gen", _ok, uses_model=True, device="cpu")
    assert ray_executor.stage_resources(pinned, 1.0, cluster_gpus=8) == {"num_cpus": 1, "num_gpus": 0}


def test_a_full_size_model_takes_a_whole_gpu_and_the_embedded_one_the_scales_share():
    script = load_script("run_issue247_orchestrator")
    assert ray_executor.model_gpus("Qwen/Qwen2.5-7B-Instruct", script.FULL) == 1.0
    assert ray_executor.model_gpus("smollm2-135m", script.TEST) == script.TEST.embedded_gpu_share == 0.125
    assert ray_executor.model_gpus("smollm2-135m", object()) == ray_executor.DEFAULT_EMBEDDED_GPU_SHARE
    with pytest.raises(ValueError, match="embedded_gpu_share"):
        ray_executor.model_gpus("smollm2-135m", argparse.Namespace(embedded_gpu_share=2.0))


def test_the_executor_flags_default_to_local_and_travel_with_the_paths(tmp_path):
    script = load_script("run_issue247_orchestrator")
    args, _run = orchestrate.cli(
        None, script.CELLS, script.SCALES, ["--scale", "test", "--out", str(tmp_path)]
    )
    assert orchestrate.experiment_paths("x", args).executor == ray_executor.Executor("local", None, 0.125)
    args, _ = orchestrate.cli(None, script.CELLS, script.SCALES, ["--scale", "full", "--out", str(tmp_path)])
    assert args.executor_options.model_gpus == 1.0


def test_without_ray_the_ray_executor_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(ray_executor, "available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        orchestrate.cli(None, ["A"], {"test": object()}, ["--executor", "ray"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "uv sync --extra ray" in err


def test_a_ray_address_without_the_ray_executor_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        orchestrate.cli(None, ["A"], {"test": object()}, ["--ray-address", "auto"])
    assert exc.value.code == 2 and "--ray-address needs --executor ray" in capsys.readouterr().err


def test_a_worker_that_cannot_see_the_store_says_to_share_it(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (uv sync --extra ray)")
    stage = Stage("root", _ok, {"n": 1})
    with pytest.raises(ray_executor.StoreNotVisible, match="mounts at the same path"):
        ray_executor._stage_task(str(tmp_path), "no-such-token", stage, stage.key, None)
    assert not (tmp_path / "stages" / stage.dirname).exists()


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for the module (starting one takes tens of seconds on 2 cores)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (uv sync --extra ray)")
    ray_executor.connect(None, num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


def _cell_files(out, cell):
    cell_dir = out / "eval_results" / "issue247" / cell
    return read_raw_completions(cell_dir / "raw_completions.json"), json.loads(
        (cell_dir / "run_result.json").read_text()
    )


@pytest.mark.slow
def test_issue247_on_ray_gives_the_local_completions_with_shared_stages_run_once(
    cluster, tmp_path, capsys, no_credentials
):
    """Two Z cells share their on-policy stage: one task computes it, then both cells fan out.

    The local run does one of the two cells (the shared stage included), to keep CI short.
    """
    script = load_script("run_issue247_orchestrator")
    argv = ["--scale", "test", "--judge", "offline", "--wandb", "disabled"]
    assert script.main([*argv, "--cells", "Z_assistant", "--out", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    cells = ["--cells", "Z_assistant", "Z_villain"]
    assert script.main([*argv, *cells, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if line.startswith("stage ")]
    names = [line.split()[1] for line in lines]
    # one line per distinct stage: the shared on-policy stage once, each cell's own stages once each
    own = ["coupling_data", "couple", "eval", "discriminator", "marker_logprob"]
    assert sorted(names) == sorted(["onpolicy", *own * 2])
    (shared,) = [line for line in lines if line.split()[1] == "onpolicy"]
    assert "[Z_assistant, Z_villain]" in shared and " CPU: " in shared

    local_raw, local_result = _cell_files(tmp_path / "local", "Z_assistant")
    ray_raw, ray_result = _cell_files(tmp_path / "ray", "Z_assistant")
    assert [r["text"] for r in ray_raw] == [r["text"] for r in local_raw]
    assert ray_result["results"] == local_result["results"]
    strip = [{k: s[k] for k in ("name", "key", "dir", "reused")} for s in local_result["stages"]]
    assert [{k: s[k] for k in ("name", "key", "dir", "reused")} for s in ray_result["stages"]] == strip
    _, villain = _cell_files(tmp_path / "ray", "Z_villain")
    assert villain["stages"][0] == {**ray_result["stages"][0], "reused": True}  # computed once, by the first
    store = tmp_path / "ray" / "eval_results" / "stages"
    for stage in ("onpolicy", "coupling_data", "couple", "eval"):  # the DAG's own stages, byte for byte
        local_files = sorted((tmp_path / "local" / "eval_results" / "stages").glob(f"{stage}-*/*.json*"))
        for path in local_files:
            if path.name not in ("DONE.json", "config.json"):
                assert (store / path.parent.name / path.name).read_bytes() == path.read_bytes(), path
    assert len(list(store.glob("onpolicy-*/DONE.json"))) == 1
    assert len(list(store.glob("couple-*/DONE.json"))) == 2
    assert not list(store.glob(".ray-store-*"))  # the driver's visibility token is gone after the run


@pytest.mark.slow
def test_a_failed_stage_fails_the_run_and_the_other_cells_are_written(cluster, tmp_path):
    def boom(ctx):
        raise ValueError("stage exploded")

    good = Stage("fine", _ok, {"n": 2})
    bad = Stage("broken", boom, {"n": 3})
    paths = orchestrate.ExperimentPaths("exp", tmp_path, executor=ray_executor.Executor("ray"))
    with pytest.raises(RuntimeError, match=r"'broken'.*stage exploded"):
        orchestrate.execute(
            paths, [Cell("good", good), Cell("bad", Stage("after", _ok, parent=bad))], config={}
        )
    assert (paths.results / "good" / "run_result.json").is_file()
    assert not (paths.results / "bad").exists()
    assert not (paths.store / "stages" / bad.dirname / "DONE.json").exists()
