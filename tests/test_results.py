import json
import os
import subprocess

import pytest

from explore_persona_space import results as R


def test_atomic_write_json_roundtrip_and_no_temp_left(tmp_path):
    path = tmp_path / "deep" / "run_result.json"
    R.atomic_write_json(path, {"rate": 0.5, "ci": (0.1, 0.9), "where": path})
    assert json.loads(path.read_text()) == {"rate": 0.5, "ci": [0.1, 0.9], "where": str(path)}
    assert [p.name for p in path.parent.iterdir()] == ["run_result.json"]


def test_crash_during_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    R.atomic_write_json(path, {"v": 1})

    def boom(src, dst):
        raise KeyboardInterrupt  # killed between the write and the rename

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        R.atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_nan_is_refused_so_undefined_must_be_null(tmp_path):
    with pytest.raises(ValueError):
        R.atomic_write_json(tmp_path / "x.json", {"p_b_given_a": float("nan")})
    assert not (tmp_path / "x.json").exists()


GOOD = {"persona": "villain", "question": "Why?", "sample": 0, "text": "Because."}


def test_raw_completions_roundtrip_with_extra_fields(tmp_path):
    path = tmp_path / "raw_completions.json"
    records = [GOOD, {**GOOD, "sample": 1, "finish_reason": "stop", "n_tokens": 3}]
    R.write_raw_completions(path, records)
    assert R.read_raw_completions(path) == records


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"persona": "x"}, "expected a JSON list"),
        ([GOOD, "oops"], "record 1 is str"),
        ([GOOD, {k: v for k, v in GOOD.items() if k != "text"}], "record 1 has no field 'text'"),
        ([{**GOOD, "sample": "0"}], "record 0 field 'sample' should be int, got str"),
        ([{**GOOD, "sample": True}], "record 0 field 'sample' should be int"),
        ([{**GOOD, "text": None}], "record 0 field 'text' should be str, got NoneType"),
    ],
)
def test_malformed_raw_completions_name_the_record(tmp_path, records, message):
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(records))
    with pytest.raises(R.RawCompletionsError, match=message) as err:
        R.read_raw_completions(path)
    assert str(path) in str(err.value)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "raw.json"
    path.write_text('[\n{"persona": "x",\n')
    with pytest.raises(R.RawCompletionsError, match="not valid JSON"):
        R.read_raw_completions(path)


def test_run_result_carries_provenance(tmp_path):
    doc = R.write_run_result(
        tmp_path / "cell" / "run_result.json",
        config={"lr": 5e-6, "epochs": 20},
        seeds={"train": 42},
        results={"source_rate": 0.9},
        timings={"train": 12.3456, "eval": 1},
    )
    on_disk = json.loads((tmp_path / "cell" / "run_result.json").read_text())
    assert on_disk == doc
    assert doc["timings_s"] == {"train": 12.346, "eval": 1.0}
    prov = doc["provenance"]
    assert prov["packages"]["numpy"] and prov["packages"]["explore-persona-space"] == "0.1.0"
    assert prov["hardware"]["cpu_count"] >= 1 and prov["hardware"]["python"].count(".") == 2
    git = prov["git"]
    if git["commit"] is not None:  # a checkout: a 40-hex commit and a boolean dirty flag
        assert len(git["commit"]) == 40 and isinstance(git["dirty"], bool)


def test_git_state_outside_a_repository(tmp_path):
    assert R.git_state(tmp_path) == {"commit": None, "dirty": None}


def test_git_state_sees_a_dirty_tree(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    clean = R.git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "f.txt").write_text("b")
    assert R.git_state(tmp_path)["dirty"] is True
