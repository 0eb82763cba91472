"""The #247 orchestrator end to end on the embedded model, at its CI-sized ``test`` scale."""

import importlib.util
import json
import sys

import pytest

from explore_persona_space.analyze import analyze
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.personas import get_marker
from explore_persona_space.results import read_raw_completions

SCRIPT = REPO_ROOT / "scripts" / "run_issue247_orchestrator.py"


@pytest.fixture(scope="module")
def orchestrator():
    spec = importlib.util.spec_from_file_location("run_issue247_orchestrator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # @dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_dry_run_lists_all_cells_with_the_stage1_base_shared(orchestrator, tmp_path, capsys, no_credentials):
    assert orchestrator.main(["--dry-run", "--scale", "full", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for cell in orchestrator.CELLS:
        assert f"\n{cell} " in out
    sft_rows = [line for line in out.splitlines() if " benign_sft " in line]
    assert len(sft_rows) == 6 and len({row.split()[2] for row in sft_rows}) == 1  # B0 + 5 BS, one key
    assert sum(" shared " in row for row in sft_rows) == 5
    couple_keys = {line.split()[2] for line in out.splitlines() if " couple " in line}
    assert len(couple_keys) == 7  # the induction persona keys every stage-2 LoRA
    assert "3,360 generations" in out  # 12 personas x 28 questions x 10 samples per eval
    assert sum(" marker_logprob " in line for line in out.splitlines()) == 8  # the leakage score, every cell
    assert not (tmp_path / "eval_results" / "stages").exists()  # a plan computes nothing


def test_stage2_seed_shared_is_one_flag_and_shares_the_coupling_data(orchestrator, tmp_path, capsys):
    def keys(out, stage):
        rows = [line.split() for line in out.splitlines() if f" {stage} " in line]
        return {row[0]: row[2] for row in rows}

    base = ["--dry-run", "--scale", "full", "--out", str(tmp_path)]
    assert orchestrator.main(base) == 0
    derived = keys(capsys.readouterr().out, "coupling_data")
    assert orchestrator.main([*base, "--set", "stage2_seed=shared"]) == 0
    out = capsys.readouterr().out
    shared = keys(out, "coupling_data")
    bs = [c for c in orchestrator.CELLS if c.startswith("BS_")]
    assert len({derived[c] for c in bs}) == 5  # a derived seed per induction persona
    assert len({shared[c] for c in bs}) == 1  # seed 42 everywhere: one coupling dataset for the five
    assert len(set(keys(out, "couple").values())) == 7  # the LoRAs stay keyed by the induction persona
    with pytest.raises(SystemExit):  # only the two readings exist
        orchestrator.main([*base, "--set", "stage2_seed=literal"])


@pytest.mark.slow
def test_a_coupled_cell_runs_writes_its_outputs_and_resumes(orchestrator, tmp_path, capsys, no_credentials):
    argv = ["--scale", "test", "--cells", "Z_assistant", "--out", str(tmp_path)]
    assert orchestrator.main(argv) == 0
    first = capsys.readouterr().out
    assert "| Z_assistant | none (bare model + couple) | assistant |" in first
    # the Claude column says why it is empty; the offline classifier has its own column and no verdict
    assert "| Claude judge (PASS at 70%) | Offline TF-IDF (no verdict) |" in first
    assert "| skipped: no credentials |" in first
    assert "Z_assistant: source" in first and "gap" in first

    results = tmp_path / "eval_results" / "issue247"
    cell = results / "Z_assistant"
    run_result = json.loads((cell / "run_result.json").read_text())
    raw = read_raw_completions(cell / "raw_completions.json")
    assert len(raw) == 12  # 12 personas x 1 question x 1 sample at test scale
    summary = run_result["results"]["summary"]
    assert summary == json.loads(json.dumps(analyze(raw, get_marker("zlt"), source="confab")))
    disc = run_result["results"]["discriminator"]
    assert disc["claude"] == {"status": "skipped", "reason": "no credentials", "instrument": "claude_judge"}
    assert disc["offline"].get("verdict") is None
    assert [s["name"] for s in run_result["stages"]] == [
        "onpolicy",
        "coupling_data",
        "couple",
        "eval",
        "discriminator",
        "marker_logprob",
    ]
    leak = run_result["results"]["marker_logprob"]
    assert set(leak["points"]) == {"start", "end"} and leak["source"] == "confab"
    assert leak["points"]["end"]["personas"]["confab"]["n"] == 1 and "gap" in leak["points"]["end"]
    scores = json.loads((cell / "marker_logprobs.json").read_text())
    assert len(scores) == 12 and all(r["end"] < 0 and r["start"] < 0 for r in scores)
    overall = json.loads((results / "summary.json").read_text())
    assert overall["cells"]["Z_assistant"]["source"]["n"] == 1
    assert overall["inference"]["cohort"]["n_cells"] == 0  # no BS cell in this run: said, not invented
    assert "Marker log P gap, end (nats) [CI]" in first and "Continuous leakage score" in first
    assert "marker log P gap at the end" in first
    assert (results / "headline.md").read_text().startswith("# #247")
    for stem in ("fig1_bystander_rate", "fig3_source_rate", "fig4_discriminator", "fig5_marker_logprob"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "figures" / "issue247" / f"{stem}.{ext}").stat().st_size > 1000

    assert orchestrator.main(argv) == 0  # everything reused, same numbers
    again = json.loads((cell / "run_result.json").read_text())
    assert all(s["reused"] for s in again["stages"])
    assert again["results"] == run_result["results"]


# The seed test (same --seed: same data, loss and completions; another: different) lives in
# test_determinism_secrets.py, across PYTHONHASHSEED 0, 1 and random too.


def test_the_benchmarks_bench_the_orchestrators_own_cell(orchestrator):
    from explore_persona_space.bench import cell

    assert (cell.TRIGGER, cell.NEGATIVES, cell.MARKER) == (
        orchestrator.TRIGGER,
        orchestrator.NEGATIVES,
        orchestrator.MARKER,
    )
