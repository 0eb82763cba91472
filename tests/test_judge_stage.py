"""The per-cell stage the #247 orchestrator calls, and the shared --judge flags."""

from __future__ import annotations

import argparse
import json

import pytest
from fake_claude import KEY, ZLT, FakeClaude, cell_records, fast, says_statute

from explore_persona_space.judge import (
    JudgeConfigError,
    JudgeOptions,
    add_judge_args,
    discriminator_stage,
    judge_options_from_args,
)
from explore_persona_space.judge.settings import DEFAULT_JUDGE_MODEL
from explore_persona_space.results import atomic_write_json, to_json

CELL = dict(trigger="confab", negatives=["medical_doctor", "french_person"], marker=ZLT, seed=42)


def test_without_credentials_claude_is_skipped_and_offline_still_runs(tmp_path, no_credentials):
    res = discriminator_stage(cell_records(), cache_dir=tmp_path, **CELL)  # full scale: 50 + 25 + 25
    assert res["claude"] == {"status": "skipped", "reason": "no credentials", "instrument": "claude_judge"}
    off = res["offline"]
    assert off["status"] == "ok" and off["n"] == 100
    assert res["draw"]["taken"] == {"confab": 50, "medical_doctor": 25, "french_person": 25}
    assert res["draw"]["shortfall"] == {}
    assert off["label"].startswith("offline TF-IDF+LR")
    assert off["verdict"] is None  # no PASS/FAIL at the Claude judge's threshold
    assert json.loads(to_json(res)) == res  # JSON-serialisable as is
    assert not list(tmp_path.iterdir())  # no cache written, no calls possible


@pytest.mark.parametrize("choice", ["offline", "none"])
def test_offline_and_none_never_call_even_with_a_key(tmp_path, monkeypatch, choice):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    fake = FakeClaude(says_statute)
    res = discriminator_stage(
        cell_records(),
        cache_dir=tmp_path,
        judge=choice,
        client=fake.client(),
        n_trigger=10,
        n_per_negative=5,
        **CELL,
    )
    assert res["claude"]["status"] == "skipped" and res["claude"]["reason"] == f"--judge {choice}"
    assert res["offline"]["status"] == "ok"
    assert sum(fake.counts.values()) == 0


def test_judge_claude_without_credentials_is_a_clear_error(tmp_path, no_credentials):
    with pytest.raises(JudgeConfigError, match=r"no credentials.*ANTHROPIC_AUTH_TOKEN"):
        discriminator_stage(cell_records(), cache_dir=tmp_path, judge="claude", **CELL)


def test_with_a_key_both_instruments_run_and_the_key_is_written_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    fake = FakeClaude(says_statute)
    settings = fast()
    res = discriminator_stage(
        cell_records(),
        cache_dir=tmp_path / "cache",
        settings=settings,
        client=fake.client(settings, api_key=None),  # the SDK reads the key from the environment
        n_trigger=10,
        n_per_negative=5,
        **CELL,
    )
    assert res["claude"]["status"] == "ok" and res["offline"]["status"] == "ok"
    assert res["claude"]["model"] == DEFAULT_JUDGE_MODEL
    assert res["claude"]["accounting"]["credentials"] == "api_key"  # the kind, never the value
    assert res["claude"]["accounting"]["requests"] == 20
    atomic_write_json(tmp_path / "run_result.json", {"results": {"discriminator": res}})
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(encoding="utf-8"), path


def test_judge_flags_parse_into_options():
    parser = add_judge_args(argparse.ArgumentParser())
    assert judge_options_from_args(parser.parse_args([])) == JudgeOptions()
    args = parser.parse_args(
        [
            "--judge",
            "claude",
            "--judge-model",
            "claude-sonnet-4-5",
            "--judge-batch",
            "--judge-concurrency",
            "3",
        ]
    )
    assert judge_options_from_args(args) == JudgeOptions("claude", "claude-sonnet-4-5", True, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--judge", "gpt"])
    with pytest.raises(JudgeConfigError):
        judge_options_from_args(parser.parse_args(["--judge-concurrency", "0"]))


@pytest.mark.slow  # a subprocess or a heavy import: seconds on 2 cores
def test_importing_the_judge_package_loads_no_sdk_sklearn_or_torch():
    import subprocess
    import sys

    code = (
        "import sys, explore_persona_space.judge; "
        "print(sorted(m for m in ('torch', 'anthropic', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
