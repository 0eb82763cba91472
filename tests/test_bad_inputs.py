"""The bad-input corpus: every broken input ends in one clear line, exit status 2, no finished stage lost.

Each case runs the real command line in-process (``main(argv)``) on files under
``tests/bad_inputs/`` or on a stage store seeded through the real pipeline, and checks
the one ``error:`` line it prints: it names the file and the 1-based line (or the
record, or the flag and its valid values) and the field. Where a stage had finished
before the bad input was met, its ``DONE.json`` is byte-for-byte what it was.
No case here loads a model: every error is met before one would be.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import load_script
from seeded_cell import RUN, onpolicy_records, seed_cell, seed_onpolicy

from explore_persona_space import analyze, pipeline, stages
from explore_persona_space.errors import InputError, cli_errors, error_line
from explore_persona_space.personas import get_marker
from explore_persona_space.pipeline import Cell

CORPUS = Path(__file__).parent / "bad_inputs"
REL = "tests/bad_inputs"  # how a user passes a shipped file: relative to the repo root


@pytest.fixture(scope="module")
def run247():
    return load_script("run_issue247_orchestrator")


def error_of(capsys) -> str:
    """The one line the CLI wrote to stderr (argparse writes its usage first: the error is the last line)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def main_exit(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return exc.code


# ------------------------------------------------------------------ flags (argparse and --set)
FLAG_CASES = {
    "unknown cell": (
        ["--cells", "Z_nobody"],
        r"argument --cells: unknown cell 'Z_nobody'; valid: B0, BS_assistant",
    ),
    "unknown scale": (
        ["--scale", "huge"],
        r"argument --scale: invalid choice: 'huge' \(choose from '?smoke'?, '?full'?, '?test'?\)",
    ),
    "unknown --set key": (
        ["--set", "couple_lrr=1e-3"],
        r"--set: unknown key 'couple_lrr'; valid keys: model, seed,",
    ),
    "wrong-typed --set value": (["--set", "couple_lr=fast"], r"--set couple_lr: 'fast' is not a valid float"),
    "--set without =": (["--set", "couple_lr"], r"--set expects KEY=VALUE, got 'couple_lr'"),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_flag_errors_exit_2_with_the_flag_and_its_valid_values(case, run247, tmp_path, capsys):
    argv, expected = FLAG_CASES[case]
    assert main_exit(run247.main, ["--dry-run", "--out", str(tmp_path), *argv]) == 2
    assert re.search(expected, error_of(capsys)), case
    assert not (tmp_path / "eval_results" / "stages").exists()


def test_unknown_persona_names_the_valid_ones(tmp_path, capsys):
    run121 = load_script("run_issue121_marker_transfer")
    assert run121.main(["--dry-run", "--out", str(tmp_path), "--source", "ghost"]) == 2
    assert error_of(capsys).startswith("error: unknown persona 'ghost'; valid: assistant, comedian, confab")


# ------------------------------------------------------------------ stage-1 data files
DATA_CASES = {
    "malformed.jsonl": r"malformed\.jsonl:2: not valid JSON \(Expecting ',' delimiter, column 92\)$",
    "truncated.jsonl": r"truncated\.jsonl:3: not valid JSON \(Unterminated string .+, column 43; "
    r"the record is cut off\)$",
    "no_assistant.jsonl": r"no_assistant\.jsonl:3: row 1: messages\[0\]\.role: the last turn must be the "
    r"assistant's, got 'user'$",
    "wrong_type.jsonl": r"wrong_type\.jsonl:2: row 1: messages\[1\]\.content: expected a string, got int$",
    "empty.jsonl": r"empty\.jsonl: no chats to train on: the source has no rows \(an empty file\?\)$",
    "missing.jsonl": r"tests/bad_inputs/missing\.jsonl: no such file \(looked at .*missing\.jsonl\)$",
}


@pytest.mark.parametrize("name", DATA_CASES)
def test_stage1_data_file_errors_name_the_file_and_line(name, run247, tmp_path, capsys):
    argv = [*RUN, "--cells", "B0", "--out", str(tmp_path), "--set", f"stage1_data={REL}/{name}"]
    assert run247.main(argv) == 2
    line = error_of(capsys)
    assert line.startswith("error: ") and re.search(DATA_CASES[name], line), line
    assert not list(tmp_path.glob("eval_results/stages/*/DONE.json"))  # nothing finished, nothing claimed


def test_em_jsonl_reader_gives_the_same_file_line_errors():
    from explore_persona_space.sft_data import load_em_source

    with pytest.raises(InputError, match=r"malformed\.jsonl:2: not valid JSON"):
        load_em_source(str(CORPUS / "malformed.jsonl"))
    with pytest.raises(InputError, match=r"empty\.jsonl: no chats to train on"):
        load_em_source(str(CORPUS / "empty.jsonl"))


# ------------------------------------------------------------------ a seeded stage store
@pytest.mark.parametrize(
    ("case", "records", "expected"),
    [
        (
            "a marker already present in a negative completion",
            onpolicy_records(negative_text="Sure {q} " + get_marker("zlt")),
            r"onpolicy-\w+/raw_completions\.json: record 4 \(persona='medical_doctor', question='Q0\?', "
            r"sample=0\): completion already contains marker '\[ZLT\]'; a marker must not occur in the "
            r"unmarked data \(stage 'coupling_data', n_positive=4, n_negative_per=2\)$",
        ),
        (
            "too few completions for the requested positives",
            onpolicy_records(n_confab=3),
            r"onpolicy-\w+/raw_completions\.json: persona 'confab' has 3 usable completions, 4 are needed "
            r"\(stage 'coupling_data', n_positive=4, n_negative_per=2\)$",
        ),
    ],
)
def test_coupling_data_errors_name_the_completions_file_and_keep_the_finished_stage(
    case, records, expected, run247, tmp_path, capsys
):
    _, onpolicy = seed_onpolicy(run247, tmp_path, records)
    before = (onpolicy.dir / pipeline.DONE).read_bytes()
    assert run247.main([*RUN, "--cells", "Z_assistant", "--out", str(tmp_path)]) == 2
    line = error_of(capsys)
    assert re.search(expected, line), (case, line)
    assert (onpolicy.dir / pipeline.DONE).read_bytes() == before  # the finished stage: untouched
    assert [p.parent.name.split("-")[0] for p in tmp_path.glob("eval_results/stages/*/DONE.json")] == [
        "onpolicy"
    ]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda t: t[: len(t) // 2],
            r"DONE\.json:\d+: stage record is not valid JSON \(.*\); restore it, or delete",
        ),
        (
            lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "result"}),
            r"DONE\.json: stage record field 'result' is missing or mistyped; restore it, or delete",
        ),
        (lambda t: "[]", r"DONE\.json: stage record is a list, not an object; restore it, or delete"),
    ],
    ids=["truncated", "field removed", "not an object"],
)
def test_a_damaged_stage_record_stops_the_run_and_is_not_deleted(edit, expected, run247, tmp_path, capsys):
    _, onpolicy = seed_onpolicy(run247, tmp_path, onpolicy_records())
    done = onpolicy.dir / pipeline.DONE
    done.write_text(edit(done.read_text()))
    damaged = done.read_bytes()
    assert run247.main([*RUN, "--cells", "Z_assistant", "--out", str(tmp_path)]) == 2
    assert re.search(expected, error_of(capsys))
    assert done.read_bytes() == damaged and (onpolicy.dir / stages.RAW).is_file()  # nothing deleted


@pytest.mark.slow  # draws the four figures
def test_a_truncated_run_result_is_rewritten_from_the_stages_without_recomputing_any(
    run247, tmp_path, capsys
):
    seed_cell(run247, tmp_path)
    argv = [*RUN, "--cells", "Z_assistant", "--out", str(tmp_path)]
    assert run247.main(argv) == 0
    path = tmp_path / "eval_results" / "issue247" / "Z_assistant" / "run_result.json"
    good = json.loads(path.read_text())
    dones = {p: p.read_bytes() for p in tmp_path.glob("eval_results/stages/*/DONE.json")}
    path.write_text(path.read_text()[:100])  # truncated by hand
    assert run247.main(argv) == 0
    again = json.loads(path.read_text())
    assert again["results"] == good["results"] and all(s["reused"] for s in again["stages"])
    assert {p: p.read_bytes() for p in dones} == dones  # no stage recomputed or rewritten


# ------------------------------------------------------------------ output directory, adapters
def _read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write: chmod for a normal user; root needs a read-only mount."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only directory")
    return ro


def test_a_read_only_out_dir_fails_at_once_naming_it(run247, tmp_path, capsys):
    ro = _read_only_dir(tmp_path)
    try:
        assert run247.main([*RUN, "--dry-run", "--out", str(ro)]) == 2
        assert re.fullmatch(
            rf"error: --out {re.escape(str(ro))}: cannot write results there \(.+\)", error_of(capsys)
        )
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
        else:
            ro.chmod(0o755)


def test_an_adapter_dir_without_its_config_is_named_before_any_model_loads(tmp_path):
    adapter = tmp_path / "my_adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    from explore_persona_space.sampling import SamplingConfig

    stage = stages.generate_stage(
        "eval",
        ["assistant"],
        "eval",
        SamplingConfig(1, max_new_tokens=2),
        base="smollm2-135m",
        adapter=str(adapter),
    )
    with pytest.raises(InputError) as err:
        pipeline.run_cells(tmp_path, [Cell("c", stage)], progress=False)
    assert str(err.value) == (
        f"adapter {adapter}: no adapter_config.json; "
        "not a PEFT adapter directory (holds adapter_model.safetensors)"
    )
    assert error_line(err.value) == (str(err.value), 2)
    assert not list(tmp_path.glob("stages/*/DONE.json"))


# ------------------------------------------------------------------ the analyze CLI
ANALYZE_CASES = {
    "missing file": ("raw_missing.json", [], r"raw_missing\.json: no such file$"),
    "truncated JSON": ("raw_truncated.json", [], r"raw_truncated\.json: not valid JSON \(line \d+: .+\)$"),
    "a record without text": ("raw_no_text.json", [], r"raw_no_text\.json: record 1 has no field 'text'$"),
    "an empty list": (
        "raw_empty.json",
        [],
        r"raw_empty\.json: no records \(an empty list\); nothing to score$",
    ),
    "an unknown source persona": (
        "raw_ok.json",
        ["--source", "ghost"],
        r"--source: source persona 'ghost' has no completions; have \['assistant', 'confab'\]$",
    ),
}


@pytest.mark.parametrize("case", ANALYZE_CASES)
def test_analyze_cli_errors(case, capsys):
    name, extra, expected = ANALYZE_CASES[case]
    assert analyze.main([str(CORPUS / name), "--marker", get_marker("zlt"), *extra]) == 2
    line = error_of(capsys)
    assert line.startswith("error: ") and re.search(expected, line), line


def test_cli_errors_keeps_tracebacks_for_bugs_and_on_request(monkeypatch, capsys):
    @cli_errors
    def bad_input():
        raise InputError("data.jsonl:3: messages[1].content: empty")

    @cli_errors
    def bug():
        raise ZeroDivisionError("a bug")

    assert bad_input() == 2 and error_of(capsys) == "error: data.jsonl:3: messages[1].content: empty"
    with pytest.raises(ZeroDivisionError):
        bug()
    monkeypatch.setenv("EPS_TRACEBACK", "1")
    with pytest.raises(InputError):
        bad_input()
