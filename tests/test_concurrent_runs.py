"""Two runs on one ``--out`` at the same moment: one computes each stage, the other waits and reuses it.

The store is seeded up to the eval stage (tests/seeded_cell.py), so both runs are the real
#247 orchestrator with only the discriminator (offline judge), the cell's files, the figures
and the summary left to write. The test holds the discriminator's stage lock itself until
both runs are waiting on it, so they overlap for certain rather than by luck of timing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, load_script
from seeded_cell import RUN, seed_cell, stage_of

from explore_persona_space import pipeline
from explore_persona_space.results import read_raw_completions


def _stderr(path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


@pytest.mark.slow  # two orchestrator subprocesses
def test_two_runs_on_one_out_compute_a_stage_once_and_leave_no_half_written_file(tmp_path):
    run247 = load_script("run_issue247_orchestrator")
    cell = seed_cell(run247, tmp_path)
    disc = stage_of(cell, "discriminator")
    lock = pipeline.stage_dir(tmp_path / "eval_results", disc)
    lock = lock.with_name(lock.name + ".lock")
    argv = [sys.executable, str(ROOT / "scripts" / "run_issue247_orchestrator.py"), *RUN]
    argv += ["--cells", "Z_assistant", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = [tmp_path / f"run{i}.err" for i in range(2)]
    with contextlib.ExitStack() as files, open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # both runs reach the stage and wait
        errs = [files.enter_context(open(log, "w")) for log in logs]
        procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=e, env=env) for e in errs]
        deadline = time.monotonic() + 300
        while sum("another process is computing it" in _stderr(log) for log in logs) < 2:
            assert all(p.poll() is None for p in procs), [_stderr(log)[-2000:] for log in logs]
            assert time.monotonic() < deadline, "the runs never waited on the stage lock"
            time.sleep(0.2)
        fcntl.flock(held, fcntl.LOCK_UN)
        codes = [p.wait(timeout=600) for p in procs]
    errs = [_stderr(log) for log in logs]
    assert codes == [0, 0], [e[-2000:] for e in errs]
    # exactly one run computed the stage; the other found it finished once the lock was its own
    assert sum("stage discriminator started" in e for e in errs) == 1
    assert sum("stage discriminator reused" in e for e in errs) == 1

    results = tmp_path / "eval_results" / "issue247"
    run_result = json.loads((results / "Z_assistant" / "run_result.json").read_text())
    assert run_result["results"]["discriminator"]["offline"]["instrument"]
    eval_dir = pipeline.stage_dir(tmp_path / "eval_results", stage_of(cell, "eval"))
    published = results / "Z_assistant" / "raw_completions.json"
    assert published.read_bytes() == (eval_dir / "raw_completions.json").read_bytes()
    assert read_raw_completions(published)
    json.loads((results / "summary.json").read_text())
    for stem in ("fig1_bystander_rate", "fig3_source_rate", "fig4_discriminator"):
        assert (tmp_path / "figures" / "issue247" / f"{stem}.png").stat().st_size > 1000
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []  # every write was renamed into place; nothing half-written remains
    assert len(list(tmp_path.glob("eval_results/stages/discriminator-*/DONE.json"))) == 1
