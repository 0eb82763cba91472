"""Stages are content-addressed, reused when finished, and survive a kill at any moment."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from explore_persona_space.pipeline import Cell, Stage, config_hash, format_plan, plan, run_cells

# A pipeline whose stages log every execution, so a test can count recomputations.
# The "slow" stage can be made to block, so the test can kill the process inside it.
CHAIN = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from explore_persona_space.pipeline import Cell, Stage, run_cells

    root = Path(sys.argv[1])
    log = root / "executions.log"

    def note(ctx):
        with open(log, "a") as fh:
            fh.write(ctx.stage.name + "\\n")

    def first(ctx):
        note(ctx)
        (ctx.dir / "numbers.json").write_text(json.dumps(list(range(ctx.stage.config["n"]))))
        return {"n": ctx.stage.config["n"]}

    def slow(ctx):
        note(ctx)
        numbers = json.loads((ctx.parent.dir / "numbers.json").read_text())
        (ctx.dir / "partial.txt").write_text("half-written")
        gate = root / "gate"
        while not gate.exists():
            time.sleep(0.05)
        return {"total": sum(numbers)}

    def final(ctx):
        note(ctx)
        total = ctx.upstream("slow").result["total"] + ctx.upstream("first").result["n"]
        (ctx.dir / "answer.json").write_text(json.dumps({"answer": total}))
        return {"answer": total}

    a = Stage("first", first, {"n": 10})
    b = Stage("slow", slow, {"k": 1}, parent=a)
    c = Stage("final", final, {}, parent=b)
    run_cells(root, [Cell("cell", c, publish=("answer.json",))], out=root / "out", progress=False)
    """
)


def _executions(root):
    path = root / "executions.log"
    return path.read_text().split() if path.exists() else []


def test_killed_mid_stage_then_rerun_finishes_without_redoing_finished_stages(tmp_path):
    script = tmp_path / "chain.py"
    script.write_text(CHAIN)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], start_new_session=True)
    deadline = time.monotonic() + 60
    while _executions(tmp_path) != ["first", "slow"]:
        assert proc.poll() is None and time.monotonic() < deadline, "chain did not reach the slow stage"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stages = tmp_path / "stages"
    slow_dir = next(stages.glob("slow-*"))
    assert (slow_dir / "partial.txt").exists() and not (slow_dir / "DONE.json").exists()

    (tmp_path / "gate").touch()
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True)
    assert _executions(tmp_path) == ["first", "slow", "slow", "final"]  # "first" ran once
    assert json.loads((tmp_path / "out" / "cell" / "answer.json").read_text()) == {"answer": 55}
    result = json.loads((tmp_path / "out" / "cell" / "run_result.json").read_text())
    assert result["results"] == {"answer": 55}
    assert [s["reused"] for s in result["stages"]] == [True, False, False]

    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True)
    assert len(_executions(tmp_path)) == 4  # a third run recomputes nothing
    again = json.loads((tmp_path / "out" / "cell" / "run_result.json").read_text())
    assert again["results"] == result["results"] and all(s["reused"] for s in again["stages"])


def _stage(name, config, parent=None, calls=None):
    def fn(ctx):
        calls.append(ctx.stage.name)
        return {"seen": ctx.parent.result if ctx.parent else None, **config}

    return Stage(name, fn, config, parent=parent)


def test_shared_stage_is_computed_once_and_keys_follow_config_and_parent(tmp_path):
    calls = []
    base = _stage("base", {"lr": 1e-4}, calls=calls)
    cells = [
        Cell(f"c{i}", _stage("couple", {"induction": p}, parent=base, calls=calls))
        for i, p in enumerate(["assistant", "villain"])
    ]
    assert cells[0].final.key != cells[1].final.key
    assert base.key == _stage("base", {"lr": 1e-4}, calls=[]).key
    assert base.key != _stage("base", {"lr": 2e-4}, calls=[]).key
    other_parent = _stage("couple", {"induction": "assistant"}, parent=_stage("base", {"lr": 2e-4}, calls=[]))
    assert other_parent.key != cells[0].final.key

    rows = plan(tmp_path, cells)
    assert [r.done for r in rows] == [False] * 4
    assert "3 distinct stage(s) to run" in format_plan(rows)
    records = run_cells(tmp_path, cells, progress=False)
    assert calls == ["base", "couple", "couple"]
    assert records["c1"][0].reused  # the second cell found the shared base finished
    assert all(r.done for r in plan(tmp_path, cells))


def test_config_hash_ignores_key_order_and_rejects_nan():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    with pytest.raises(ValueError):
        config_hash({"lr": float("nan")})


def test_a_failing_stage_leaves_no_done_marker_and_reruns(tmp_path):
    attempts = []

    def flaky(ctx):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("boom")
        return {"ok": True}

    cell = Cell("c", Stage("flaky", flaky, {}))
    with pytest.raises(RuntimeError):
        run_cells(tmp_path, [cell], progress=False)
    assert not any(tmp_path.glob("stages/*/DONE.json"))
    assert run_cells(tmp_path, [cell], progress=False)["c"][0].result == {"ok": True}
