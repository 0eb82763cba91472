"""#121 marker transfer: the full plan (13 forward + 6 reverse cells, one coupling adapter reused, the EM
stage shared with #125), the CLI's --source/--seeds/--cells, and the script end to end at test scale."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

from explore_persona_space.analyze import analyze
from explore_persona_space.personas import get_marker
from explore_persona_space.results import read_raw_completions

RUN = load_script("run_issue121_marker_transfer")
ZLT = get_marker("zlt")


def plan_rows(text: str) -> list[list[str]]:
    rows = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    return rows[1:-1]


def keys(rows) -> dict[tuple[str, str], str]:
    return {(r[0], r[1]): r[2] for r in rows}


def test_full_plan_has_13_forward_and_6_reverse_cells_and_one_coupling_adapter(tmp_path, capsys):
    assert RUN.main(["--dry-run", "--scale", "full", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "# issue121/evil_ai: stages under" in out and "full scale, model" in out
    rows = plan_rows(out)
    mine = keys(rows)
    cells = list(dict.fromkeys(r[0] for r in rows))
    forward = ["C4", *(f"{c}_s{s}" for c in ("C1", "C2", "C3", "C5") for s in (42, 137, 256))]
    reverse = [f"R_{s}_{m}" for s in ("none", "em", "benign") for m in ("premade", "scratch")]
    assert cells == forward + reverse
    source_couple = mine[("C4", "couple")]
    users = {c for (c, stage), k in mine.items() if stage == "couple" and k == source_couple}
    assert users == {"C4", *(f"{c}_s{s}" for c in ("C1", "C5") for s in (42, 137, 256)), "R_none_premade"}
    assert mine[("C3_s42", "couple")] != source_couple  # the assistant's own coupling
    assert len({k for (c, stage), k in mine.items() if stage == "couple" and c.startswith("C3")}) == 1
    for stage1 in ("em", "benign"):  # the pre-made adapter is C4's coupling, named in the plan
        assert f"re-apply the LoRA of couple-{source_couple}" in out
        assert mine[(f"R_{stage1}_scratch", "couple")] not in (
            source_couple,
            mine[("R_none_scratch", "couple")],
        )
    assert mine[("R_none_premade", "alignment")] == mine[("C4", "alignment")]  # C4 itself
    assert mine[("R_none_scratch", "coupling_data")] == mine[("C4", "coupling_data")]
    assert mine[("R_em_premade", "em")] == mine[("C2_s42", "em")] != mine[("C2_s137", "em")]
    assert len({mine[(f"C1_s{s}", "em")] for s in (42, 137, 256)}) == 3
    assert "60 epochs" in out and "20 epochs" in out and "arc_challenge: all items" in out
    assert not (tmp_path / "eval_results" / "stages").exists()
    run125 = load_script("run_issue125_confab_three_way")  # same EM recipe and data: the same stages
    assert run125.main(["--dry-run", "--scale", "full", "--out", str(tmp_path)]) == 0
    theirs = keys(plan_rows(capsys.readouterr().out))
    assert mine[("C2_s42", "em")] == theirs[("C2", "em")]
    assert mine[("R_em_premade", "em_merged")] == theirs[("B", "em_merged")]


def test_source_seeds_and_cells_flags(tmp_path, capsys):
    argv = ["--dry-run", "--scale", "full", "--out", str(tmp_path), "--source", "villain", "--seeds", "7"]
    assert RUN.main([*argv, "--cells", "C1", "R_em_premade"]) == 0
    out = capsys.readouterr().out
    assert "# issue121/villain:" in out
    assert list(dict.fromkeys(r[0] for r in plan_rows(out))) == ["C1_s7", "R_em_premade"]
    assert RUN.main(["--dry-run", "--out", str(tmp_path), "--source", "medical_doctor"]) == 2
    assert "the source cannot be the assistant or a negative persona" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        RUN.main(["--dry-run", "--out", str(tmp_path), "--cells", "C6"])


def test_smoke_scale_runs_the_seed_42_cells_by_default(tmp_path, capsys):
    assert RUN.main(["--dry-run", "--out", str(tmp_path)]) == 0
    cells = list(dict.fromkeys(r[0] for r in plan_rows(capsys.readouterr().out)))
    assert cells == ["C4", "C1_s42", "C2_s42", "C3_s42", "C5_s42", *RUN.REVERSE]
    assert RUN.main(["--dry-run", "--out", str(tmp_path), "--seeds", "42", "137", "256"]) == 0
    assert len(set(r[0] for r in plan_rows(capsys.readouterr().out))) == 13 + 6


CELLS = ["C4", "C2", "C5", "R_benign_premade", "R_none_scratch"]  # every stage kind the script chains


@pytest.mark.slow
def test_test_scale_run_writes_everything_and_reuses_every_stage(tmp_path, capsys, no_credentials):
    argv = ["--scale", "test", "--out", str(tmp_path), "--cells", *CELLS]
    assert RUN.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| C5 seed=42 (benign SFT) |" in printed and "Forward-order conjunction" in printed
    assert "Reverse order" in printed and "G4 (EM succeeded" in printed and "not evaluated" in printed
    results = tmp_path / "eval_results" / "issue121" / "evil_ai"
    names = ["C4", "C2_s42", "C5_s42", "R_benign_premade", "R_none_scratch"]
    for cell in names:
        run_result = json.loads((results / cell / "run_result.json").read_text())
        raw = read_raw_completions(results / cell / "raw_completions.json")
        res = run_result["results"]
        assert len(raw) == 12 and res["summary"] == json.loads(
            json.dumps(analyze(raw, ZLT, source="evil_ai"))
        )
        assert res["capability"]["n"] == 3 and res["alignment"]["status"] == "skipped"
    stages = [
        s["name"]
        for s in json.loads((results / "R_benign_premade" / "run_result.json").read_text())["stages"]
    ]
    assert stages == [
        "benign_sft",
        "benign_sft_merged",
        "couple_reapplied",
        "eval",
        "capability",
        "alignment",
    ]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["conjunction"]["cells"] == ["C2_s42", "C5_s42"] and "C2_s42" in summary["g4"]["cells"]
    for stem in ("fig1_forward_per_persona", "fig2_reverse_panel", "fig3_capability_alignment"):
        assert (tmp_path / "figures" / "issue121" / "evil_ai" / f"{stem}.png").stat().st_size > 1000
    assert RUN.main(argv) == 0
    for cell in names:
        again = json.loads((results / cell / "run_result.json").read_text())
        assert all(s["reused"] for s in again["stages"]), cell
