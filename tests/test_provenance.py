"""Every finished stage says what computed it; results-changing EPS_* variables enter the stage key."""

from __future__ import annotations

import json

from explore_persona_space.pipeline import DONE, Cell, Stage, run_cells, stage_dir
from explore_persona_space.results import git_state


def _write(ctx):
    (ctx.dir / "x.txt").write_text(str(ctx.stage.config["n"]))
    return {"n": ctx.stage.config["n"]}


def test_done_json_records_provenance_and_a_reused_stage_keeps_its_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("EPS_RESIDENT", "0")  # recorded, not keyed
    first = Stage("first", _write, {"n": 1})
    final = Stage("final", _write, {"n": 2}, parent=first)
    cells = [Cell("c", final)]
    run_cells(tmp_path, cells, progress=False)
    done = json.loads((stage_dir(tmp_path, first) / DONE).read_text())
    prov = done["provenance"]
    assert prov["git"] == git_state()  # this checkout's commit and dirty flag
    assert set(prov["packages"]) == {"torch", "transformers", "peft", "trl"}
    assert prov["env"]["EPS_RESIDENT"] == "0" and prov["keyed_env"] == {}
    assert {"device", "device_name", "dtype", "created_utc"} <= set(prov)

    # Pretend older code computed the first stage; a rerun reuses it and must say so.
    done["provenance"]["git"] = {"commit": "0" * 40, "dirty": True}
    (stage_dir(tmp_path, first) / DONE).write_text(json.dumps(done))
    run_cells(tmp_path, cells, progress=False)
    result = json.loads((tmp_path / "c" / "run_result.json").read_text())
    stages = {s["name"]: s for s in result["stages"]}
    assert all(s["reused"] for s in stages.values())
    assert (stages["first"]["commit"], stages["first"]["dirty"]) == ("0" * 40, True)
    assert stages["final"]["commit"] == git_state()["commit"]
    assert result["provenance"]["git"] == git_state()  # the run that wrote this file


def test_a_stage_from_before_provenance_reads_as_unknown(tmp_path):
    stage = Stage("old", _write, {"n": 3})
    run_cells(tmp_path, [Cell("c", stage)], progress=False)
    done = json.loads((stage_dir(tmp_path, stage) / DONE).read_text())
    (stage_dir(tmp_path, stage) / DONE).write_text(json.dumps({k: done[k] for k in ("result", "seconds")}))
    run_cells(tmp_path, [Cell("c", stage)], progress=False)
    entry = json.loads((tmp_path / "c" / "run_result.json").read_text())["stages"][0]
    assert entry["reused"] and entry["commit"] is None and entry["dirty"] is None


def test_results_changing_env_enters_the_key(monkeypatch):
    stage = Stage("s", _write, {"n": 1})
    plain = stage.key
    monkeypatch.setenv("EPS_DTYPE", "float32")
    assert stage.key != plain
    child = Stage("t", _write, {}, parent=stage)
    fp32_child = child.key
    monkeypatch.setenv("EPS_RESIDENT", "1")  # speed only: not keyed
    monkeypatch.setenv("EPS_CACHE_DIR", "/elsewhere")
    assert child.key == fp32_child
    monkeypatch.delenv("EPS_DTYPE")
    assert stage.key == plain  # unset: the key of a store written before the variable was keyed
