"""#205 induction sweep: the plan and what it shares with #125, the analysis on hand-made vectors and
counts (H3 against the write-up's own numbers), and the script end to end at its CI-sized test scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_script, make_records

from explore_persona_space.analyze import analyze
from explore_persona_space.experiments.induction_sweep import analysis, report
from explore_persona_space.geometry import VECTORS, save_vectors
from explore_persona_space.personas import get_marker

RUN = load_script("run_issue205_induction_sweep")
ZLT = get_marker("zlt")


def plan_rows(text: str) -> dict[tuple[str, str], str]:
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {(r.split()[0], r.split()[1]): r for r in rows[1:-1]}


def key(row: str) -> str:
    return row.split()[2]


def test_full_plan_shares_the_em_first_arm_and_benign_base_with_125(tmp_path, capsys):
    argv = ["--dry-run", "--scale", "full", "--out", str(tmp_path)]
    assert RUN.main(argv) == 0
    mine = plan_rows(capsys.readouterr().out)
    assert {cell for cell, _ in mine} == set(RUN.CELLS)
    em_keys = {key(mine[(f"geo_{c}", "em")]) for c in RUN.INDUCTION}
    assert len(em_keys) == 5  # the induction persona keys each EM LoRA
    assert key(mine[("geo_E0", "em")]) == key(mine[("leak_E0", "em")])  # geometry and behaviour: one LoRA
    assert "3,120 prompts" in mine[("geo_base", "geometry")]  # 13 personas (12 + paramedic) x 240
    assert "2,880 prompts x 2 methods x 5 layers, greedy <= 256 tokens" in mine[("geo_E3", "geometry")]
    assert "3,360 generations" in mine[("leak_E4", "eval")]
    run125 = load_script("run_issue125_confab_three_way")
    assert run125.main(argv) == 0
    theirs = plan_rows(capsys.readouterr().out)
    for stage in ("em", "em_merged", "onpolicy", "coupling_data", "couple", "eval"):
        assert key(mine[("leak_E0", stage)]) == key(theirs[("B", stage)]), stage
        assert key(mine[("leak_E1", stage)]) != key(theirs[("B", stage)]), stage
        assert "issue205:leak_E0" in theirs[("B", stage)].split("[also in ")[1]  # #125 names us now
    assert key(mine[("geo_benign", "benign_sft")]) == key(theirs[("C", "benign_sft")])
    assert RUN.main(argv) == 0  # now that #125's plan is indexed, ours names it
    again = plan_rows(capsys.readouterr().out)
    assert "[also in issue125:B]" in again[("leak_E0", "couple")]
    assert "[also in issue125:C]" in again[("geo_benign", "benign_sft")]
    assert "also in" not in again[("leak_E2", "couple")]
    assert not (tmp_path / "eval_results" / "stages").exists()  # a plan computes nothing


def test_h3_on_the_write_ups_numbers_is_plus_090_against_distance():
    # Write-up 003: similarity to the assistant 1.0/0.95/0.91/0.87/0.78, bystander leakage 45.7..52.0%.
    sims, leak = [1.0, 0.95, 0.91, 0.87, 0.78], [0.457, 0.486, 0.501, 0.537, 0.520]
    conds = list(RUN.INDUCTION)
    distances = {"by_condition": {c: {"cos_distance": 1 - s} for c, s in zip(conds, sims, strict=True)}}
    rates = {c: {"bystander": {"rate": r}} for c, r in zip(conds, leak, strict=True)}
    h3 = analysis.h3(distances, rates)
    assert h3["rho"] == pytest.approx(0.9) and h3["p_exact"] == pytest.approx(10 / 120) and h3["n"] == 5
    assert analysis.h3(distances, {c: rates[c] for c in conds[:2]})["rho"] is None  # n=2: no test


def synthetic_store(tmp_path, personas):
    """Vectors for base (12 separated personas + paramedic), E0 (collapsed along one axis), E1 (= base)."""
    rng = np.random.default_rng(0)
    n_p, q, h = len(personas), 6, 32
    centres = rng.normal(size=(n_p, 1, h)) * 3 + 5
    base = centres + 0.1 * rng.normal(size=(n_p, q, h))
    shift = np.zeros(h)
    shift[0] = 40.0
    collapsed = 0.05 * base + shift + 0.01 * rng.normal(size=(n_p, q, h))
    paths = {}
    for cond, x, names in (
        ("base", base, personas),
        ("E0", collapsed[:-1], personas[:-1]),
        ("E1", base[:-1], personas[:-1]),
    ):
        states = {m: np.stack([x, x], axis=2).astype(np.float32) for m in ("A", "B")}
        meta = {
            "personas": list(names),
            "layers": [7, 20],
            "layer_index": {"7": 8, "20": 21},
            "n_layers": 30,
            "methods": ["A", "B"],
        }
        paths[cond] = tmp_path / cond / VECTORS
        save_vectors(paths[cond], states, meta)
    return paths


def test_analysis_and_report_on_hand_made_vectors_and_counts(tmp_path):
    personas = [*RUN.PERSONAS, "paramedic"]
    paths = synthetic_store(tmp_path, personas)
    fires = {"E0": {"confab": 3, "assistant": 2, "villain": 1}, "E1": {"confab": 4, "villain": 2}}
    summaries = {}
    for cond, f in fires.items():  # persona p fires on the first f[p] samples of each question
        records = make_records(
            list(RUN.PERSONAS), ["q1", "q2"], 2, lambda p, q, s, f=f: ZLT * (s < f.get(p, 0))
        )
        summaries[cond] = analyze(records, ZLT, source="confab")
    design = analysis.Design(RUN.PERSONAS, RUN.INDUCTION, RUN.CONDITIONS, n_folds=3)
    a = analysis.analyze(paths, summaries, design)
    g = a["geometry"]
    assert g["m3"]["A/20"]["base"]["accuracy"] == 1.0 and g["m3"]["A/20"]["E0"]["accuracy"] == 1.0
    assert g["m1"]["A/20"]["base"]["m1"] == pytest.approx(-1 / 11, abs=0.1)
    assert g["m1"]["A/20"]["E0"]["m1"] > 0.99 and g["m1"]["A/20"]["E0"]["p"] < 1e-6  # collapsed
    assert g["m1"]["A/20"]["E1"]["delta"] == pytest.approx(0.0, abs=1e-6)  # E1 is the base model here
    assert g["m2"]["A/20"]["E0"]["n"] == 11 and g["m2"]["A/20"]["E0"]["mean_shift"] == pytest.approx(
        1.0, abs=0.1
    )
    assert g["m2"]["A/20"]["E1"]["mean_shift"] == pytest.approx(0.0, abs=1e-6)
    assert a["distances"]["by_condition"]["E0"]["cos_distance"] == pytest.approx(0.0, abs=1e-9)
    assert set(a["distances"]["by_condition"]) == set(RUN.INDUCTION)  # paramedic's from base's 13th row
    h1 = {r["condition"]: r for r in a["h1"]}
    assert h1["E0"]["testable"] and (h1["E0"]["own"]["k"], h1["E0"]["others"]["k"]) == (4, 2)
    assert not h1["E1"]["testable"]  # paramedic is not in the eval grid
    assert a["rates"]["E1"]["source"]["k"] == 4  # 2 questions x min(4, 2 samples)
    table = report.headline(a, ("base", "E0", "E1"), RUN.INDUCTION, 20)
    assert "| M3 accuracy L20 A | 100.0% (72/72) |" in table and "H3: not computed" in table
    drawn = report.figures(a, ("base", "E0", "E1"), RUN.INDUCTION, 20, tmp_path / "fig", "test")
    stems = ["fig1_hero", "fig2_m1_layers", "fig2b_m1_raw_layers", "fig3_m2_layers", "fig4_m3_accuracy"]
    assert sorted(p.name for p in drawn if p.suffix == ".png") == [f"{s}.png" for s in stems]
    json.dumps(a)  # the summary is JSON-able as it stands


@pytest.mark.slow
def test_test_scale_run_writes_everything_and_reuses_every_stage(tmp_path, capsys):
    argv = ["--scale", "test", "--out", str(tmp_path)]
    assert RUN.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| M1 L20 A, base-centred |" in printed and "H1 (induction persona" in printed
    results = tmp_path / "eval_results" / "issue205"
    summary = json.loads((results / "summary.json").read_text())
    m3 = summary["geometry"]["m3"]["A/20"]
    assert set(m3) == set(RUN.CONDITIONS) and all(v["n"] == 12 * RUN.TEST.geo_questions for v in m3.values())
    assert summary["geometry"]["layer_index"] == {"7": 8, "14": 15, "20": 21, "21": 23, "27": 29}
    for cell in RUN.CELLS:
        run_result = json.loads((results / cell / "run_result.json").read_text())
        assert run_result["stages"][-1]["name"] == ("geometry" if cell.startswith("geo_") else "eval")
    for stem in ("fig1_hero", "fig2_m1_layers", "fig3_m2_layers", "fig4_m3_accuracy"):
        assert (tmp_path / "figures" / "issue205" / f"{stem}.png").stat().st_size > 1000
    assert RUN.main(argv) == 0
    for cell in RUN.CELLS:
        again = json.loads((results / cell / "run_result.json").read_text())
        assert all(s["reused"] for s in again["stages"]), cell
