"""A short kill soak (tools/kill_soak.py): two kill -9 trials, during judging and during the report.

The store is seeded up to the eval stage without a model (tests/seeded_cell.py), so the
soak's uninterrupted baseline and both trials run the real #247 orchestrator for the
discriminator (Claude judge on the loopback fake API, slowed to a second a reply) and the
figures and summary. The full soak - kills during sampling and training too, N = 20 - is
``uv run python tools/kill_soak.py``; RELIABILITY.md has its table.
"""

from __future__ import annotations

import importlib.util
import random
import sys

import pytest
from conftest import ROOT, load_script
from fake_claude import FakeClaude
from seeded_cell import seed_cell


def load_tool():
    spec = importlib.util.spec_from_file_location("kill_soak", ROOT / "tools" / "kill_soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_soak"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three orchestrator runs and two kills, as subprocesses
def test_short_soak_resumes_identically_and_redoes_no_finished_stage(tmp_path):
    soak = load_tool()
    seed_cell(load_script("run_issue247_orchestrator"), tmp_path / "baseline" / "out")
    with FakeClaude(soak.slow_judge(1.0)).serve() as url:
        base = soak.baseline(tmp_path, url)
        assert base["phase_s"]["discriminator"] > 2  # three replies, one at a time
        rng = random.Random(0)
        rows = [
            soak.trial(i, phase, tmp_path, url, base, rng)
            for i, phase in ((1, "discriminator"), (2, "report"))
        ]
    print(soak.table(rows))
    for row in rows:
        assert row["rerun_exit"] == 0
        assert row["killed_during"] != "finished before the kill", row
        assert row["identical"], row["differ"]
        assert row["recomputed_wrongly"] == []
    assert rows[0]["done_at_kill"] == ["couple", "coupling_data", "eval", "onpolicy"]
    assert rows[1]["done_at_kill"] == [
        "couple",
        "coupling_data",
        "discriminator",
        "eval",
        "marker_logprob",
        "onpolicy",
    ]
