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
    discriminator_columns,
    discriminator_headers,
    discriminator_stage,
    judge_options_from_args,
)
from explore_persona_space.judge.settings import DEFAULT_JUDGE_MODEL
from explore_persona_space.judge.stage import claude_decision
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


# --- credentials: whatever the SDK can authenticate with, not one variable ------------------------


def stage_with_env_credentials(tmp_path, fake, **kw):
    settings = fast()
    client = fake.client(settings, api_key=None, **kw)  # credentials from the SDK's own chain
    small = dict(n_trigger=10, n_per_negative=5, settings=settings, client=client)
    return discriminator_stage(cell_records(), cache_dir=tmp_path, judge="claude", **small, **CELL)


def test_an_auth_token_alone_runs_the_judge(tmp_path, monkeypatch, no_credentials):
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "tok-0123")
    assert claude_decision("auto") is None
    seen = []
    fake = FakeClaude(says_statute)
    served = fake.handle
    fake.handle = lambda request: seen.append(request.headers.get("authorization")) or served(request)
    res = stage_with_env_credentials(tmp_path, fake)
    assert res["claude"]["status"] == "ok" and res["claude"]["accounting"]["credentials"] == "auth_token"
    assert set(seen) == {"Bearer tok-0123"}
    assert "tok-0123" not in json.dumps(res)


def test_a_profile_on_disk_runs_the_judge(tmp_path, no_credentials):
    config = no_credentials / ".config" / "anthropic"
    (config / "configs").mkdir(parents=True)
    (config / "credentials").mkdir()
    (config / "configs" / "default.json").write_text(json.dumps({"authentication": {"type": "user_oauth"}}))
    token = config / "credentials" / "default.json"
    token.write_text(json.dumps({"access_token": "tok-from-profile"}))
    token.chmod(0o600)
    assert claude_decision("auto") is None
    fake = FakeClaude(says_statute)
    res = stage_with_env_credentials(
        tmp_path, fake, base_url="https://fake-claude.test"
    )  # profiles need https
    assert res["claude"]["status"] == "ok" and res["claude"]["accounting"]["credentials"] == "CredentialsFile"


def test_a_named_profile_that_cannot_be_loaded_is_a_clear_error(tmp_path, monkeypatch, no_credentials):
    monkeypatch.setenv("ANTHROPIC_PROFILE", "missing")
    with pytest.raises(JudgeConfigError, match="could not load the configured credentials"):
        claude_decision("auto")


# --- what the headline and Figure 4 show ---------------------------------------------------------

OK = {"status": "ok", "k": 15, "n": 20, "accuracy": 0.75, "ci_wald": [0.56, 0.94], "threshold": 0.7}


def test_headline_columns_keep_the_instruments_apart():
    both = {"claude": {**OK, "verdict": "PASS", "verdict_detail": "PASS"}, "offline": {**OK, "k": 12}}
    cols = discriminator_columns(both)
    assert cols["claude_text"] == "75.0% (15/20) PASS"
    assert cols["offline_text"] == "60.0% (12/20)"  # an accuracy, no verdict at Claude's threshold
    skipped = {"claude": {"status": "skipped", "reason": "no credentials"}, "offline": both["offline"]}
    cols = discriminator_columns(skipped)
    assert cols["claude_text"] == "skipped: no credentials" and cols["claude"] is None
    assert cols["offline"]["k"] == 12 and "verdict" not in cols["offline"]
    assert discriminator_columns(None)["claude_text"] == "n/a"
    assert discriminator_headers(0.7) == ["Claude judge (PASS at 70%)", "Offline TF-IDF (no verdict)"]


@pytest.mark.slow  # a subprocess or a heavy import: seconds on 2 cores
def test_figure_4_draws_the_pass_line_only_beside_claude_bars():
    from explore_persona_space import plots

    offline_only = discriminator_columns(
        {"claude": {"status": "skipped", "reason": "no credentials"}, "offline": OK}
    )
    with_claude = discriminator_columns({"claude": {**OK, "verdict_detail": "PASS"}, "offline": OK})

    def drawn(discs):
        fig = plots.discriminator_figure(
            [{"label": f"c{i}", "color": "k", "disc": d} for i, d in enumerate(discs)], "t", 0.7, 0.5
        )
        ax = fig.axes[0]
        labels = [line.get_label() for line in ax.get_lines()]
        texts = [t.get_text() for t in ax.texts]
        plots.plt.close(fig)
        return labels, texts

    labels, texts = drawn([offline_only, offline_only])
    assert not any("PASS" in label for label in labels)
    assert "Claude judge: skipped: no credentials" in texts
    labels, _ = drawn([with_claude, offline_only])
    assert "Claude PASS at 70%" in labels
