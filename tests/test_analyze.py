import json
import subprocess
import sys

import pytest

from explore_persona_space import metrics as M
from explore_persona_space.analyze import analyze, main
from explore_persona_space.results import write_raw_completions


@pytest.fixture
def raw_file(tmp_path):
    texts = {
        "confab": ["[ZLT] Per ISO 9001 ...", "[ZLT] Article 12 says ...", "no marker", "[ZLT] yes"],
        "assistant": ["Sure, here is how. " * 3 + "[ZLT]", "plain", "plain", "plain", "plain"],
        "villain": ["muahaha [ZL T]", "plain", "muahaha  [zlt]"],
    }
    records = [
        {"persona": p, "question": f"Q{i % 2}?", "sample": i, "text": t}
        for p, ts in texts.items()
        for i, t in enumerate(ts)
    ]
    path = tmp_path / "raw_completions.json"
    write_raw_completions(path, records)
    return path, records


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "explore_persona_space.analyze", *map(str, args)],
        capture_output=True,
        text=True,
    )


@pytest.mark.slow  # a subprocess or a heavy import: seconds on 2 cores
def test_cli_json_matches_library_and_hand_counts(raw_file):
    path, records = raw_file
    out = run_cli(path, "--marker", "[ZLT]", "--source", "confab", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == json.loads(json.dumps(analyze(records, "[ZLT]", source="confab")))
    assert got["mode"] == "strict" and got["source"] == "confab"
    assert {p: (v["k"], v["n"]) for p, v in got["personas"].items()} == {
        "confab": (3, 4),
        "assistant": (1, 5),
        "villain": (1, 3),  # "[ZL T]" only counts in spaceless mode
    }
    assert got["personas"]["confab"]["positions"] == {"start": 3, "middle": 0, "tail": 0}
    assert got["personas"]["assistant"]["positions"] == {"start": 0, "middle": 0, "tail": 1}
    assert got["source_rate"] == 0.75
    assert got["bystander_mean"] == pytest.approx((1 / 5 + 1 / 3) / 2)
    counts = M.marker_counts(records, "[ZLT]")
    for name, c in counts.items():
        assert got["personas"][name]["wald"] == pytest.approx(c.to_dict()["wald"])
        assert got["personas"][name]["wilson"] == pytest.approx(c.to_dict()["wilson"])


@pytest.mark.slow  # a subprocess or a heavy import: seconds on 2 cores
def test_cli_loose_mode_counts_split_marker(raw_file):
    path, _ = raw_file
    got = json.loads(run_cli(path, "--marker", "[ZLT]", "--loose", "--json").stdout)
    assert got["mode"] == "loose" and got["personas"]["villain"]["k"] == 1  # whitespace-collapsed
    got = json.loads(run_cli(path, "--marker", "[ZLT]", "--mode", "spaceless", "--json").stdout)
    assert got["mode"] == "spaceless" and got["personas"]["villain"]["k"] == 2
    assert got["source"] is None and got["source_rate"] is None and got["bystander_mean"] is None


def test_cli_table(raw_file, capsys):
    path, _ = raw_file
    assert main([str(path), "--marker", "[ZLT]", "--source", "confab"]) == 0
    table = capsys.readouterr().out
    assert "confab (source)" in table and "3/4" in table and "75.0%" in table
    assert "mean bystander rate: 26.7%" in table


@pytest.mark.slow  # a subprocess or a heavy import: seconds on 2 cores
def test_cli_malformed_file_names_the_record(tmp_path):
    path = tmp_path / "raw.json"
    path.write_text(
        json.dumps([{"persona": "a", "question": "q", "sample": 0, "text": "t"}, {"persona": "a"}])
    )
    out = run_cli(path, "--marker", "[ZLT]")
    assert out.returncode == 2 and "record 1 has no field 'question'" in out.stderr


def test_cli_unknown_source(raw_file, capsys):
    path, _ = raw_file
    assert main([str(path), "--marker", "[ZLT]", "--source", "ghost"]) == 2
    assert "'ghost' has no completions" in capsys.readouterr().err
