"""#261 / #354 end to end: the full-scale plan, a CI-sized run that resumes, tables and figures."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

from explore_persona_space.experiments.two_marker.plots import all_figures
from explore_persona_space.experiments.two_marker.report import headline, rates_table, summarize
from explore_persona_space.experiments.two_marker.scoring import FLOOR_CELL, score_records
from explore_persona_space.orchestrate import Resolved
from explore_persona_space.personas import EVAL_PERSONAS, display_name, get_marker

A, B = get_marker("a"), get_marker("b")
script = load_script
RUN_261 = "run_issue261_within_marker"
RUN_354 = "run_issue354_eos_masked_within_marker"
DESIGN, SCALES = script(RUN_261).DESIGN, script(RUN_261).SCALES


def test_full_scale_plans_share_onpolicy_and_floor(tmp_path, capsys):
    plans = {}
    for name in (RUN_261, RUN_354):
        assert script(name).main(["--dry-run", "--scale", "full", "--out", str(tmp_path)]) == 0
        plans[name] = capsys.readouterr().out
    for text in plans.values():
        assert "20 distinct stage(s) to run, 0 done" in text
        assert "2,200 generations x <= 600 tokens" in text and "1,200 examples" in text
        assert "2,860 + probe 50 generations" in text and "LoRA r=16, 3 epochs, lr 1e-05" in text

    def keys(text, stage):
        return {line.split()[2] for line in text.splitlines() if line.split()[1:2] == [stage]}

    for stage in ("onpolicy", "floor"):
        assert keys(plans[RUN_261], stage) == keys(plans[RUN_354], stage)
    assert keys(plans[RUN_261], "train").isdisjoint(keys(plans[RUN_354], "train"))


@pytest.mark.slow
def test_ci_sized_run_writes_outputs_and_resumes(tmp_path, capsys):
    argv = ["--scale", "test", "--cells", "pair1_T", "--out", str(tmp_path), "--device", "cpu"]
    assert script(RUN_261).main(argv) == 0
    printed = capsys.readouterr().out
    assert "falsification" in printed and "weird-marker probe, pair1 T" in printed
    results = tmp_path / "eval_results" / "issue261"
    cell = results / "pair1_T"
    for name in ("run_result.json", "raw_completions.json", "probe_completions.json"):
        assert (cell / name).is_file(), name
    raw = json.loads((cell / "raw_completions.json").read_text())
    scale = SCALES["test"]
    n_q = scale.id_questions + scale.ood_questions
    assert len(raw) == len(EVAL_PERSONAS) * n_q * scale.eval.n_samples
    assert {r["split"] for r in raw} == {"id", "ood"}
    summary = json.loads((results / "summary.json").read_text())
    assert set(summary["cells"]) == {"pair1_T"} and FLOOR_CELL in summary["missing_cells"]
    assert (results / "headline.md").read_text().startswith("# #261")
    figures = sorted(p.name for p in (tmp_path / "figures" / "issue261").iterdir())
    assert len(figures) == 8 and "p_b_given_a.png" in figures

    first = json.loads((cell / "run_result.json").read_text())
    assert [s["name"] for s in first["stages"]] == ["onpolicy", "dataset", "train", "eval"]
    assert not any(s["reused"] for s in first["stages"])
    assert script(RUN_261).main(argv) == 0
    again = json.loads((cell / "run_result.json").read_text())
    assert all(s["reused"] for s in again["stages"])
    assert again["results"] == first["results"]


# ----------------------------------------------------------------------------- report and figures
def fake_results(signal: float) -> dict:
    """Hand-made eval results for all seven cells; ``signal`` scales how often the markers fire."""
    out = {}
    questions = [(f"q{i}", "ood" if i == 3 else "id") for i in range(4)]
    for name, pair, condition in DESIGN.adapter_cells():
        texts = {pair.donor: [f"{A} x {B}"] * 3 + ["x"], pair.recipient: [f"{A} x"] * 2 + ["x"] * 2}
        if condition == "T":
            texts[pair.recipient] = [f"{A} x {B}", f"{A} x"] + ["x"] * 2
            texts["police_officer"] = [f"{A} x {B}"] + ["x"] * 3
        if condition == "T_P2neg":
            texts[pair.recipient] = ["x"] * 4
        n = max(1, round(4 * signal))
        recs = [
            {"persona": p, "question": q, "sample": s, "split": sp, "text": t if s < n else "x"}
            for p in EVAL_PERSONAS
            for q, sp in questions
            for s, t in enumerate(texts.get(p, ["x"] * 4))
        ]
        metrics = score_records(recs, DESIGN.roles(pair), mode="loose", n_boot=200, seed=0)
        probe = {"persona": pair.recipient, "n": 4, "a": 0, "b": 1, "echo": 3, "a_rate": 0.0}
        probe |= {"b_rate": 0.25, "echo_rate": 0.75}
        out[name] = {"metrics": metrics, "n": len(recs), "probe": probe if condition == "T" else None}
    floor = [{"persona": p, "question": "q0", "sample": 0, "split": "id", "text": "x"} for p in EVAL_PERSONAS]
    roles = dict.fromkeys(EVAL_PERSONAS, "base")
    floor_metrics = score_records(floor, roles, mode="loose", n_boot=200, seed=0)
    out[FLOOR_CELL] = {"metrics": floor_metrics, "n": 11, "probe": None}
    return out


@pytest.mark.slow  # a subprocess or a heavy import: seconds on 2 cores
def test_report_tables_and_figures_from_hand_made_results(tmp_path):
    run354 = script(RUN_354)
    design, run = run354.DESIGN, Resolved("test", run354.SCALES["test"])
    fixed, nonfixed = fake_results(0.5), fake_results(1.0)
    summary = summarize(nonfixed, design=design, run=run)
    assert (summary["model"], summary["seed"], summary["design"]["eos_in_loss"]) == (
        "smollm2-135m",
        42,
        False,
    )
    assert summary["missing_cells"] == []
    gates = summary["pairs"]["pair1"]["sanity_gates"]
    assert [g["status"] for g in gates] == ["FAIL", "FAIL", "PASS", "FAIL", "PASS", "PASS"]
    falsification = summary["pairs"]["pair1"]["falsification"]
    assert falsification["status"] == "FAIL" and falsification["value"] == pytest.approx(0.5)
    table, rows = run354.design_comparison(fixed=fixed, nonfixed=nonfixed)
    assert len(rows) == 6 and "P(B\\|A)" in table
    text = headline(summary, design, table)
    assert "| pair1 | falsification \\|dP(B\\|A)\\| (T-C) | 50.0% |" in text
    assert "undefined" in text  # the T_P2neg recipient never emits A
    # every persona its own row; the gate count the code computes; ID/OOD trigger and the ratio
    assert f"| pair1 | T | bystander | {display_name('police_officer')} |" in text
    assert "pooled" not in rates_table(summary, design)
    assert "pair1: 3 of 6 sanity gates failed (3 passed, 0 undefined)" in text
    ratio = summary["pairs"]["pair1"]["bystander_recipient_ratio"]
    assert (ratio["bystander"], ratio["ratio"]) == ("police_officer", 2.0) and "= 2.0x" in text
    assert not summary["pairs"]["pair1"]["id_ood"]["fires"] and "does not fire" in text  # same texts ID/OOD
    paths = all_figures(summary, design.pairs, tmp_path) + run354.comparison_figure(rows, tmp_path)
    assert len(paths) == 10 and all(p.stat().st_size > 1000 for p in paths)
    json.dumps(summary, allow_nan=False)  # summary.json may not hold NaN
