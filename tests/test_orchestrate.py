"""The orchestrators' shared layer: CLI, overrides, leakage numbers, figures."""

import dataclasses

import pytest

from explore_persona_space import leakage, orchestrate, plots
from explore_persona_space.analyze import analyze


@dataclasses.dataclass(frozen=True)
class Knobs:
    model: str = "smollm2-135m"
    seed: int = 42
    lr: float = 1e-4


def test_parser_validates_cells_and_refuses_unknown_flags(capsys):
    p = orchestrate.parser("doc", ["A", "B"], scales=("smoke", "full"))
    args = p.parse_args(["--cells", "B", "--dry-run", "--scale", "full"])
    assert (args.cells, args.dry_run, args.scale, args.backend) == (["B"], True, "full", "auto")
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--cells", "C"])
    assert exc.value.code == 2 and "unknown cell 'C'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args(["--epochs", "3"])


def test_set_accumulates_over_repeated_flags():
    p = orchestrate.parser("doc", ["A"], scales=("smoke", "full"))
    args = p.parse_args(["--set", "a=1", "b=2", "--set", "c=3"])
    assert args.overrides == ["a=1", "b=2", "c=3"]


def test_resolve_scale_exits_2_on_a_bad_override(capsys):
    p = orchestrate.parser("doc", ["A"], scales=("smoke", "full"))
    scales = {"smoke": Knobs(), "full": Knobs(model="Qwen/Qwen2.5-7B-Instruct", lr=1.0)}
    assert orchestrate.resolve_scale(p, p.parse_args(["--scale", "full"]), scales).scale.lr == 1.0
    with pytest.raises(SystemExit) as exc:
        orchestrate.resolve_scale(p, p.parse_args(["--set", "lr=fast"]), scales)
    assert exc.value.code == 2 and "'fast' is not a valid float" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        orchestrate.resolve_scale(p, p.parse_args(["--set", "depth=3"]), scales)
    assert exc.value.code == 2 and "valid keys: model, seed, lr" in capsys.readouterr().err


def test_the_model_belongs_to_the_scale_and_a_mismatch_is_recorded(caplog):
    p = orchestrate.parser("doc", ["A"], scales=("smoke", "full"))
    scales = {"smoke": Knobs(), "full": Knobs(model="Qwen/Qwen2.5-7B-Instruct")}
    full = orchestrate.resolve_scale(p, p.parse_args(["--scale", "full"]), scales)
    smoke = orchestrate.resolve_scale(p, p.parse_args([]), scales)
    assert (full.model, full.model_note) == ("Qwen/Qwen2.5-7B-Instruct", None)
    assert (smoke.model, smoke.model_note) == ("smollm2-135m", None)
    alias = orchestrate.resolve_scale(p, p.parse_args(["--scale", "full", "--model", "qwen2.5-7b"]), scales)
    assert (alias.model, alias.model_note) == ("Qwen/Qwen2.5-7B-Instruct", None)  # the alias is one stage key
    caplog.clear()
    odd = orchestrate.resolve_scale(p, p.parse_args(["--scale", "full", "--model", "smollm2-135m"]), scales)
    assert odd.model == "smollm2-135m" and "full protocol on the embedded" in odd.model_note
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [odd.model_note]
    assert odd.to_dict()["model_note"] == odd.model_note
    big = orchestrate.resolve_scale(p, p.parse_args(["--model", "some/7b"]), scales)
    assert "smoke scale is sized for smollm2-135m, running on some/7b" in big.model_note


def test_seed_flag_sets_the_one_seed():
    p = orchestrate.parser("doc", ["A"], scales=("smoke", "full"))
    run = orchestrate.resolve_scale(p, p.parse_args(["--seed", "137", "--set", "lr=2"]), {"smoke": Knobs()})
    assert (run.seed, run.scale.lr, run.to_dict()["seed"]) == (137, 2.0, 137)


def test_select_keeps_script_order():
    cells = [orchestrate.Cell(n, final=None) for n in ("B0", "BS_a", "Z_a")]
    assert [c.name for c in orchestrate.select(cells, ["Z_a", "B0"])] == ["B0", "Z_a"]
    assert orchestrate.select(cells, None) == cells


def test_tables_and_rate_text():
    assert orchestrate.rate_text(278, 280) == "99.3% (278/280)"
    assert orchestrate.rate_text(3, 8, rate=0.25) == "25.0% (3/8)"
    assert (orchestrate.pct(None), orchestrate.pct(0.125)) == ("n/a", "12.5%")
    assert orchestrate.markdown_table(["P(B|A)"], [["x|y"]]).splitlines()[2] == "| x\\|y |"
    assert orchestrate.rate_text(385, 3080) == "12.5% (385/3,080)"
    assert orchestrate.rate_text(0, 0) == "n/a"
    md = orchestrate.markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]


def _records():
    # source "s": 3/4 fire at the start; bystanders b1: 1/4 at the tail, b2: 0/4.
    recs = []
    for i in range(4):
        recs.append(
            {"persona": "s", "question": f"q{i}", "sample": 0, "text": ("[M] answer" if i < 3 else "a")}
        )
        tail = "x" * 40 + " [M]" if i == 0 else "plain"
        recs.append({"persona": "b1", "question": f"q{i}", "sample": 0, "text": tail})
        recs.append({"persona": "b2", "question": f"q{i}", "sample": 0, "text": "plain"})
    return recs


def test_cell_rates_positions_and_bystander_table():
    summary = analyze(_records(), "[M]", source="s")
    rates = leakage.cell_rates(summary)
    assert rates["source"] | {"wald": None} == {"persona": "s", "k": 3, "n": 4, "rate": 0.75, "wald": None}
    by = rates["bystander"]
    assert (by["k"], by["n"], by["rate"], by["pooled_rate"]) == (1, 8, 0.125, 0.125)
    assert by["wald"][0] == 0.0 and 0.35 < by["wald"][1] < 0.36  # 0.125 +- 1.96 * sqrt(.125*.875/8)
    split = leakage.position_split([summary, summary])
    assert split["source"]["counts"] == {"start": 6, "middle": 0, "tail": 0}
    assert split["bystander"] == {
        "firings": 2,
        "counts": {"start": 0, "middle": 0, "tail": 2},
        "shares": {"start": 0.0, "middle": 0.0, "tail": 1.0},
    }
    table = leakage.bystander_table({"c1": summary})
    assert table == {
        "b1": {"c1": {"k": 1, "n": 4, "rate": 0.25}},
        "b2": {"c1": {"k": 0, "n": 4, "rate": 0.0}},
    }
    with pytest.raises(ValueError, match="source"):
        leakage.cell_rates(analyze(_records(), "[M]"))


@pytest.mark.slow  # a subprocess or a heavy import: seconds on 2 cores
def test_cell_figures_are_written_as_png_and_pdf(tmp_path):
    summary = analyze(_records(), "[M]", source="s")
    cells = [
        {"label": "c1", "color": plots.PALETTE["blue"], **leakage.cell_rates(summary), "disc": None},
        {"label": "c2", "color": plots.PALETTE["green"], **leakage.cell_rates(summary), "disc": None},
    ]
    figs = {
        "by": plots.bystander_figure(cells, "t", band=(0.4, 0.5, "band")),
        "src": plots.source_figure(cells, "t"),
        "pos": plots.position_figure(leakage.position_split([summary]), "t"),
        "disc": plots.discriminator_figure(cells, "t", threshold=0.7, chance=0.5),
    }
    for stem, fig in figs.items():
        png, pdf = plots.save_figure(fig, tmp_path, stem)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert pdf.read_bytes()[:5] == b"%PDF-"
    assert not list(tmp_path.glob(".tmp-*"))


def test_plans_are_indexed_and_a_stage_another_experiment_plans_is_marked(tmp_path, caplog):
    from explore_persona_space.pipeline import Cell, Stage

    def chain(*names):
        stage = None
        for name in names:
            stage = Stage(name, lambda ctx: {}, {"what": name}, parent=stage)
        return stage

    mine = orchestrate.ExperimentPaths("exp_b", tmp_path)
    theirs = orchestrate.ExperimentPaths("exp_a", tmp_path)
    assert "also in" not in orchestrate.plan_text(mine, [Cell("x", chain("shared", "own_b"))])
    orchestrate.plan_text(theirs, [Cell("y", chain("shared", "own_a"))])
    text = orchestrate.plan_text(mine, [Cell("x", chain("shared", "own_b"))])
    shared, own = (line for line in text.splitlines() if line.startswith("x "))
    assert shared.endswith("[also in exp_a:y]") and "also in" not in own
    assert sorted(p.name for p in (tmp_path / "eval_results" / "plans").iterdir()) == [
        "exp_a-default.json",
        "exp_b-default.json",
    ]
    (tmp_path / "eval_results" / "plans" / "exp_c-full.json").write_text("{not json")
    assert "[also in exp_a:y]" in orchestrate.plan_text(mine, [Cell("x", chain("shared"))])
    assert "ignoring the unreadable plan index" in caplog.text
