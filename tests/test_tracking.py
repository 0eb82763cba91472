"""wandb tracking: mode choice, what a cell's run holds, and real offline runs read back from disk.

The slow tests start real offline wandb runs (wandb's core process, no network) around
model-free stages and read them back with :mod:`explore_persona_space.tracking_offline`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from explore_persona_space import orchestrate, tracking
from explore_persona_space.pipeline import Cell, Stage, run_cells
from explore_persona_space.tracking_offline import TransactionLogError, read_run, records

SUMMARY = {
    "source": "confab",
    "personas": {
        "confab": {"k": 3, "n": 4, "rate": 0.75, "wald": [0.33, 1.0]},
        "assistant": {"k": 1, "n": 4, "rate": 0.25, "wald": [0.0, 0.67]},
        "villain": {"k": 0, "n": 4, "rate": 0.0, "wald": [0.0, 0.0]},
    },
    "bystander_mean": 0.125,
}


# ----------------------------------------------------------------------------- fast: no wandb process
@pytest.mark.parametrize(
    ("env", "mode"),
    [
        (None, "offline"),
        ("online", "online"),
        ("disabled", "disabled"),
        ("dryrun", "offline"),
        ("bogus", "offline"),
    ],
)
def test_default_mode_follows_wandb_mode(monkeypatch, env, mode):
    if env is None:
        monkeypatch.delenv("WANDB_MODE")
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert tracking.default_mode() == mode
    args = orchestrate.parser(None, ["A"], ("test",)).parse_args([])
    assert args.wandb == mode


def test_online_without_credentials_logs_offline_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no such file: no netrc entry either
    tracker = tracking.Tracker.for_mode("online")
    assert tracker.mode == "offline" and "no wandb credentials" in tracker.note
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret-key\n")
    assert tracking.Tracker.for_mode("online").mode == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.Tracker.for_mode("online").mode == "online"
    with pytest.raises(ValueError, match="unknown wandb mode"):
        tracking.Tracker.for_mode("sometimes")


def test_disabled_tracking_never_imports_wandb_and_observes_nothing(tmp_path):
    tracker = tracking.Tracker.for_mode("disabled")
    assert type(tracker.observer("exp", tmp_path, {})) is tracking.Observer
    assert tracker.log_experiment("exp", tmp_path, tmp_path, {}) is None
    assert tracking.trainer_callbacks() == []  # outside a tracked stage, the trainer gets nothing


def test_flatten_keeps_scalars_splits_intervals_and_drops_curves():
    flat = tracking.flatten(
        {
            "a": {"rate": 0.5, "wald": [0.1, 0.9], "ok": True, "why": "skipped"},
            "losses": [3, 2, 1],
            "none": None,
        },
        "results",
    )
    assert flat == {
        "results/a/rate": 0.5,
        "results/a/wald_low": 0.1,
        "results/a/wald_high": 0.9,
        "results/a/ok": True,
        "results/a/why": "skipped",
    }
    assert len(tracking.flatten({str(i): i for i in range(50)}, "x", limit=10)) == 10


def test_cell_metrics_add_the_leakage_score_with_its_interval():
    metrics = tracking.cell_metrics({"model": {"base": "m"}, "summary": SUMMARY, "n": 12})
    assert metrics["leakage/source_rate"] == 0.75 and metrics["leakage/source_k"] == 3
    assert metrics["leakage/bystander_rate"] == 0.125  # the unweighted mean over bystanders
    assert (metrics["leakage/bystander_k"], metrics["leakage/bystander_n"]) == (1, 8)
    assert 0 <= metrics["leakage/bystander_ci_low"] < 0.125 < metrics["leakage/bystander_ci_high"]
    assert metrics["results/summary/personas/confab/wald_high"] == 1.0 and metrics["results/n"] == 12
    assert not any(k.startswith("results/model") for k in metrics)
    assert not any(
        k.startswith("leakage/") for k in tracking.cell_metrics({"summary": {**SUMMARY, "source": None}})
    )


class FakeRun:
    def __init__(self):
        self.metrics, self.rows = [], []

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, row):
        self.rows.append(row)


def test_the_training_callback_logs_each_stage_against_its_own_step():
    run = FakeRun()
    observer = tracking.CellRuns(tracking.Tracker("offline"), "exp", Path("."), {})
    observer.run = run
    stage = Stage("couple", lambda ctx: {}, {})
    with observer.stage(None, stage):
        (callback,) = tracking.trainer_callbacks()
    assert tracking.trainer_callbacks() == []  # only while the stage runs
    state = SimpleNamespace(global_step=3, is_world_process_zero=True)
    callback.on_train_begin(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 2.5, "learning_rate": 1e-4, "note": "text"})
    assert run.metrics == [("train/couple/step", None), ("train/couple/*", "train/couple/step")]
    assert run.rows == [
        {"train/couple/loss": 2.5, "train/couple/learning_rate": 1e-4, "train/couple/step": 3}
    ]


# ----------------------------------------------------------------------------- slow: real offline runs
def _cells(fail: bool = False) -> list[Cell]:
    def data(ctx):
        (ctx.dir / "data.txt").write_text("rows\n")
        return {"rows": 4}

    def evaluate(ctx):
        if fail:
            raise RuntimeError("judge fell over")
        return {
            "model": {"base": "m", "adapter": None},
            "summary": SUMMARY,
            "n": 12,
            "judge": {"status": "skipped"},
        }

    first = Stage("data", data, {"rows": 4, "blob": "x" * 40_000})  # > one 32 KiB block of the log
    return [Cell("Z_assistant", Stage("eval", evaluate, {"questions": 2}, parent=first), seeds={"eval": 42})]


def _runs(results: Path) -> list:
    # wait: right after finish() wandb's core may still be writing the log
    runs = [read_run(d, wait=60) for d in (results / "wandb").glob("offline-run-*")]
    return sorted(runs, key=lambda r: r.started)


@pytest.mark.slow
def test_a_cell_run_read_back_holds_config_provenance_metrics_and_run_result(tmp_path):
    results, config = (
        tmp_path / "eval_results" / "exp",
        {"scale": "test", "scale_config": {"lr": 7e-4}, "seed": 42},
    )
    tracker = tracking.Tracker.for_mode("offline")
    observer = tracker.observer("exp", results, config)
    run_cells(
        tmp_path / "eval_results", _cells(), out=results, config=config, progress=False, observer=observer
    )
    (run,) = _runs(results)
    run_result = json.loads((results / "Z_assistant" / "run_result.json").read_text())

    assert (run.name, run.group, run.job_type, run.project) == ("Z_assistant", "exp", "Z", tracking.PROJECT)
    assert run.exit_code == 0 and run_result["tracking"]["wandb"]["run_id"] == run.run_id
    assert run.config["scale"] == "test" and run.config["scale_config"] == {"lr": 7e-4}
    assert (
        run.config["seeds"] == {"eval": 42} and run.config["stages"]["data"]["config"]["blob"] == "x" * 40_000
    )
    assert run.config["provenance"]["eval"]["git"] == run_result["provenance"]["git"]  # the stage's own
    assert run.summary["stages/data/reused"] is False and run.summary["stages/eval/seconds"] >= 0
    assert run.summary["leakage/source_rate"] == 0.75 and run.summary["results/judge/status"] == "skipped"
    (artifact,) = run.artifacts
    assert artifact["type"] == "run_result" and Path(artifact["files"]["run_result.json"]).is_relative_to(
        run.path
    )
    assert (
        json.loads(Path(artifact["files"]["run_result.json"]).read_text())["results"] == run_result["results"]
    )

    # a rerun reuses both stages: a new run says so, with the original timings
    observer = tracker.observer("exp", results, config)
    run_cells(
        tmp_path / "eval_results", _cells(), out=results, config=config, progress=False, observer=observer
    )
    again = _runs(results)[1]
    assert again.summary["stages/data/reused"] is True and again.summary["stages/eval/reused"] is True
    assert again.summary["stages/data/seconds"] == run.summary["stages/data/seconds"]
    assert tracker.runs == 2 and tracker.seconds > 0


@pytest.mark.slow
def test_a_failed_cell_finishes_its_run_with_the_error_and_the_error_still_raises(tmp_path):
    results = tmp_path / "exp"
    observer = tracking.Tracker.for_mode("offline").observer("exp", results, {})
    with pytest.raises(RuntimeError, match="judge fell over"):
        run_cells(tmp_path / "store", _cells(fail=True), out=results, progress=False, observer=observer)
    (run,) = _runs(results)
    assert run.exit_code == 1 and run.summary["error"] == "RuntimeError: judge fell over"
    assert run.summary["stages/data/reused"] is False and not (results / "Z_assistant").exists()


@pytest.mark.slow
def test_the_summary_run_carries_the_figures_and_summary_json(tmp_path):
    results, figures = tmp_path / "eval_results" / "exp", tmp_path / "figures" / "exp"
    figures.mkdir(parents=True)
    Image.new("RGB", (8, 6), "white").save(figures / "fig1.png")
    paths = orchestrate.ExperimentPaths("exp", tmp_path, tracker=tracking.Tracker.for_mode("offline"))
    orchestrate.write_outputs(paths, {"cells": {"A": {"rate": 0.5, "wald": [0.2, 0.8]}}}, "| a |", "Exp")
    (run,) = _runs(results)
    assert run.job_type == "summary" and run.summary["summary/cells/A/wald_high"] == 0.8
    assert run.summary["figures/fig1"]["_type"] == "image-file"
    assert (run.path / "files" / run.summary["figures/fig1"]["path"]).is_file()
    (artifact,) = run.artifacts
    assert set(artifact["files"]) == {"summary.json", "headline.md"}


@pytest.mark.slow
def test_the_reader_stops_at_a_torn_tail_and_rejects_other_files(tmp_path):
    results = tmp_path / "exp"
    observer = tracking.Tracker.for_mode("offline").observer("exp", results, {})
    run_cells(tmp_path / "store", _cells(), out=results, progress=False, observer=observer)
    (log_file,) = (results / "wandb").glob("offline-run-*/run-*.wandb")
    assert read_run(log_file.parent, wait=60).exit_code == 0  # the core has finished writing
    whole = list(records(log_file))
    assert {r.WhichOneof("record_type") for r in whole} >= {"run", "config", "summary", "artifact", "exit"}
    torn = tmp_path / "torn" / "run-x.wandb"
    torn.parent.mkdir()
    torn.write_bytes(log_file.read_bytes()[: log_file.stat().st_size - 5])
    assert [r.num for r in records(torn)] == [r.num for r in whole][: len(list(records(torn)))]
    assert 0 < len(list(records(torn))) < len(whole)
    torn.write_bytes(b"not a log")
    with pytest.raises(TransactionLogError, match="not a wandb transaction log"):
        list(records(torn))


def test_a_run_wandb_cannot_start_is_recorded_and_the_cell_still_runs(tmp_path, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("no api key (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    results = tmp_path / "exp"
    observer = tracking.Tracker.for_mode("offline").observer("exp", results, {})
    run_cells(tmp_path / "store", _cells(), out=results, progress=False, observer=observer)
    run_result = json.loads((results / "Z_assistant" / "run_result.json").read_text())
    assert run_result["tracking"] == {
        "wandb": {"mode": "offline", "status": "skipped: wandb could not start a run"}
    }
    assert run_result["results"]["n"] == 12
