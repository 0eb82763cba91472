"""#125 confab three-way: the plan and what it shares with #247, the contrasts on hand-made counts,
and the script end to end at its CI-sized test scale."""

from __future__ import annotations

import json

import pytest
from conftest import load_script, make_records

from explore_persona_space.analyze import analyze
from explore_persona_space.personas import eval_personas_with, get_marker
from explore_persona_space.results import read_raw_completions

RUN = load_script("run_issue125_confab_three_way")
ZLT = get_marker("zlt")


def plan_keys(text: str) -> dict[tuple[str, str], str]:
    rows = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    return {(r[0], r[1]): r[2] for r in rows[1:-1]}


def test_full_plan_shares_the_benign_base_and_onpolicy_data_with_247(tmp_path, capsys):
    assert RUN.main(["--dry-run", "--scale", "full", "--out", str(tmp_path)]) == 0
    mine = plan_keys(capsys.readouterr().out)
    assert {cell for cell, _ in mine} == {"C4", "A", "C2", "B", "C"}
    assert mine[("C2", "em")] == mine[("B", "em")]  # one EM LoRA on the bare model, shared
    assert mine[("A", "em")] != mine[("C2", "em")]  # A's EM trains on the coupled model
    run247 = load_script("run_issue247_orchestrator")
    assert run247.main(["--dry-run", "--scale", "full", "--out", str(tmp_path)]) == 0
    theirs = plan_keys(capsys.readouterr().out)
    for stage in ("benign_sft", "benign_sft_merged", "onpolicy"):
        assert mine[("C", stage)] == theirs[("BS_assistant", stage)], stage
    assert mine[("C4", "onpolicy")] == theirs[("Z_assistant", "onpolicy")]
    assert mine[("C4", "couple")] != theirs[("Z_assistant", "couple")]  # #247 derives stage-2 seeds
    assert not (tmp_path / "eval_results" / "stages").exists()


def test_stage1_row_options_reach_the_benign_spec_and_stay_shared_with_247(tmp_path, capsys):
    from explore_persona_space.orchestrate import cli
    from explore_persona_space.sft_data import TULU3, RowOptions, hf_chat_spec

    options = ("revision=v1.0", "shuffle=true", "skip_invalid=true")
    sets = [arg for o in options for arg in ("--set", f"benign_rows.{o}")]
    args, run = cli(RUN.__doc__, tuple(RUN.CELLS), RUN.SCALES, ["--scale", "full", *sets])
    cells = RUN.build_cells(run.scale, args)
    benign = next(s for c in cells for s in c.final.chain() if s.name == "benign_sft")
    rows = RowOptions(revision="v1.0", shuffle=True, skip_invalid=True)
    assert benign.config["data"] == hf_chat_spec(TULU3, 6000, rows, seed=42)
    keys = {}
    for script, group in ((RUN, "benign_rows"), (load_script("run_issue247_orchestrator"), "stage1_rows")):
        sets = [arg for o in options for arg in ("--set", f"{group}.{o}")]
        assert script.main(["--dry-run", "--scale", "full", "--out", str(tmp_path), *sets]) == 0
        keys[group] = plan_keys(capsys.readouterr().out)
    assert keys["benign_rows"][("C", "benign_sft")] == keys["stage1_rows"][("BS_assistant", "benign_sft")]
    assert RUN.main(["--dry-run", "--scale", "full", "--out", str(tmp_path)]) == 0
    assert plan_keys(capsys.readouterr().out)[("C", "benign_sft")] != keys["benign_rows"][("C", "benign_sft")]


def summary(fires: dict[str, int], n: int = 280) -> dict:
    """An analyze() summary where persona p fires ``fires[p]`` of n times (0 if not named)."""

    def text(p, q, s):
        return f"answer {ZLT}" if s < fires.get(p, 0) else "answer"

    return analyze(make_records(list(eval_personas_with("confab")), ["q"], n, text), ZLT, source="confab")


def test_contrasts_and_forward_verdict_on_hand_made_counts():
    b = dict.fromkeys(RUN.BYSTANDERS, 140) | {"assistant": 127, "confab": 267, RUN.FICTIONAL: 90}
    cells = {
        "C4": summary({"confab": 210}),
        "A": summary({}),
        "B": summary(b),
        "C": summary({"confab": 71, "zelthari_scholar": 1}),
    }
    out = RUN.analyze_cells(cells)
    tests = {c["contrast"]: c for c in out["contrasts"]}
    assert tests["B vs C: assistant"]["p_text"] == "p<1e-46"  # 127/280 vs 0/280, the write-up's case
    assert tests["A vs C4: source"]["a"]["k"] == 0 and tests["A vs C4: source"]["b"]["k"] == 210
    assert tests["A vs C4: source"]["p_fisher"] < 1e-90
    by = out["groups"]["B"]["bystander"]
    assert (by["k"], by["n"]) == (9 * 140 + 90, 2800)
    assert by["rate"] == pytest.approx((9 * 0.5 + 90 / 280) / 10)  # unweighted mean of the 10
    zel = tests["B: zelthari_scholar vs the other 9 bystanders"]
    assert (zel["a"]["k"], zel["b"]["k"], zel["b"]["n"]) == (90, 1260, 2520) and zel["p_fisher"] < 1e-7
    assert out["groups"]["C"]["bystander"]["k"] == 1 and "C2" not in out["groups"]
    verdict = out["forward_verdict"]
    assert verdict["destroyed"] and (verdict["k"], verdict["n"]) == (0, 12 * 280)
    assert not RUN.analyze_cells({"A": summary({"assistant": 1})})["forward_verdict"]["destroyed"]


@pytest.mark.slow
def test_test_scale_run_writes_everything_and_reuses_every_stage(tmp_path, capsys):
    argv = ["--scale", "test", "--out", str(tmp_path)]
    assert RUN.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| C1 (forward) | couple -> EM |" in printed and "Forward order:" in printed
    results = tmp_path / "eval_results" / "issue125"
    for cell in RUN.CELLS:
        run_result = json.loads((results / cell / "run_result.json").read_text())
        raw = read_raw_completions(results / cell / "raw_completions.json")
        assert len(raw) == 12 and run_result["results"]["summary"] == json.loads(
            json.dumps(analyze(raw, ZLT, source="confab"))
        )
    summary_json = json.loads((results / "summary.json").read_text())
    assert summary_json["em_data"]["md5"] and summary_json["em_data"]["matches_writeup"] is False
    for stem in ("fig1_three_way", "fig2_em_first_per_persona"):
        assert (tmp_path / "figures" / "issue125" / f"{stem}.png").stat().st_size > 1000
    assert RUN.main(argv) == 0
    for cell in RUN.CELLS:
        again = json.loads((results / cell / "run_result.json").read_text())
        assert all(s["reused"] for s in again["stages"]), cell
