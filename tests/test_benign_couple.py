"""#247's inferential layer on hand-made cases and on write-up 000's own numbers."""

import pytest

from explore_persona_space.experiments.benign_couple import analysis as A
from explore_persona_space.experiments.benign_couple import report as R

# Write-up 000, Headline numbers: bystander k/3,080 per BS cell (assistant .. villain).
WRITEUP_BS = {
    "assistant": 385,
    "paramedic": 458,
    "kindergarten_teacher": 214,
    "french_person": 336,
    "villain": 405,
}
N = 3080


@pytest.fixture(scope="module")
def ref():
    return A.load_reference()


def test_the_reference_file_holds_the_quoted_205_values(ref):
    values = ref["bystander_rate"]["values"]
    assert list(values.values()) == [0.457, 0.486, 0.501, 0.537, 0.520]
    assert "assistant 45.7%; paramedic 48.6%" in ref["bystander_rate"]["quote"]
    assert ref["n_per_cell"]["value"] == 3080
    assert ref["file"] == "data/reference/issue205_em_first.json"
    assert R.em_first_band()[:2] == (0.457, 0.537)


def test_cohort_on_the_writeups_numbers():
    c = A.cohort({p: k / N for p, k in WRITEUP_BS.items()})
    assert round(100 * c["mean"], 1) == 11.7  # "Mean bystander leakage ... is 11.7%"
    assert round(100 * c["sd_across_cells"], 1) == 2.7  # "SD across cells 2.7pp"
    assert [round(100 * x, 1) for x in c["range"]] == [6.9, 14.9]  # "range 6.9-14.9%"
    assert c["band"] == "intermediate" and not c["escalation"]["advised"]  # "below that band"


@pytest.mark.parametrize(
    ("mean", "band", "escalate"),
    [
        (0.049, "no_leakage", False),
        (0.05, "intermediate", False),
        (0.1499, "intermediate", False),
        (0.15, "intermediate", True),
        (0.25, "intermediate", True),
        (0.2501, "symmetric", True),
        (0.30, "symmetric", True),
        (0.3001, "symmetric", False),
    ],
)
def test_band_edges_and_the_escalation_rule(mean, band, escalate):
    c = A.cohort({"a": mean, "b": mean})
    assert (c["band"], c["escalation"]["advised"]) == (band, escalate)
    assert c["sd_across_cells"] == 0.0


def test_cohort_with_no_cell():
    assert A.cohort({})["mean"] is None


def test_paired_differences_and_tests_on_the_writeups_numbers(ref):
    out = A.paired_vs_205({p: {"k": k, "n": N} for p, k in WRITEUP_BS.items()}, ref)
    diffs = {r["induction"]: round(100 * r["difference"], 1) for r in out["rows"]}
    # "paired per-cell differences 33.2-43.2pp, mean 38.3pp"
    assert diffs == {
        "assistant": 33.2,
        "paramedic": 33.7,
        "kindergarten_teacher": 43.2,
        "french_person": 42.8,
        "villain": 38.9,
    }
    assert [round(100 * x, 1) for x in out["range"]] == [33.2, 43.2]
    assert 38.3 <= 100 * out["mean_difference"] < 38.4  # 38.35 from the exact k: the write-up rounds down
    # "p < 1e-50 against the #205 E0/assistant 45.7% point"; every cell clears it
    assert all(r["p_fisher"] < 1e-50 and r["p_text"].startswith("p<1e-") for r in out["rows"])
    first = out["rows"][0]
    assert (first["k_205"], first["n_205"]) == (round(0.457 * N), N)


def test_paired_test_on_a_hand_made_case_and_no_variance(ref):
    out = A.paired_vs_205({"assistant": {"k": 5, "n": 10}}, ref)
    row = out["rows"][0]
    assert row["difference"] == pytest.approx(0.457 - 0.5)
    assert 0 < row["p_fisher"] <= 1 and 0 < row["p_z"] <= 1
    fake = {**ref, "bystander_rate": {**ref["bystander_rate"], "values": {"x": 0.0}}}
    none = A.paired_vs_205({"x": {"k": 0, "n": 10}, "not_in_205": {"k": 1, "n": 2}}, fake)
    assert len(none["rows"]) == 1 and none["rows"][0]["p_text"] == "undefined (no variance)"


def test_spearman_reproduces_205_and_checks_the_writeups_cells(ref):
    out = A.spearman_check({p: k / N for p, k in WRITEUP_BS.items()}, ref)
    # #205's own gradient recomputed from the reference: rho = -0.90, p_exact = 0.083
    assert out["reference_rho_recomputed"] == pytest.approx(-0.9)
    assert round(out["reference_p_exact_recomputed"], 3) == 0.083
    # #247's cells against the same similarities: ranks 3,5,1,2,4 vs 5,4,3,2,1 -> rho = +0.10
    assert out["rho"] == pytest.approx(0.1)
    assert out["reappears"] is False  # the write-up: "the gradient does not reproduce"
    assert out["vs_205_rates"]["rho"] == pytest.approx(-0.3)
    perfect = A.spearman_check({"assistant": 0.1, "paramedic": 0.2, "kindergarten_teacher": 0.3}, ref)
    assert perfect["rho"] == pytest.approx(-1.0) and perfect["reappears"] is True
    assert A.spearman_check({"assistant": 0.1, "villain": 0.2}, ref)["rho"] is None  # n < 3


def test_within_persona_sd():
    table = {
        "librarian": {"BS_a": {"rate": 0.10}, "BS_b": {"rate": 0.20}, "Z_a": {"rate": 0.9}},
        "villain": {"BS_a": {"rate": 0.05}, "BS_b": {"rate": 0.05}},
        "solo": {"BS_a": {"rate": 0.3}},
    }
    out = A.within_persona_sd(table, ["BS_a", "BS_b"])
    assert out["personas"]["librarian"]["sd"] == pytest.approx(0.05)  # ddof 0
    assert out["personas"]["villain"]["sd"] == 0.0 and "solo" not in out["personas"]
    assert out["range"] == pytest.approx([0.0, 0.05])


def test_leak_gap_text():
    leak = {"points": {"end": {"gap": {"logprob": {"estimate": 1.234, "ci": [0.5, 2.0]}}}}}
    assert R.leak_gap_text(leak) == "+1.23 [+0.50, +2.00]"
    assert R.leak_gap_text(None) == "n/a" and R.leak_gap_text(leak, "start") == "n/a"
