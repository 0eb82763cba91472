"""The Claude discriminator against a local fake endpoint, through the real SDK."""

from __future__ import annotations

import shutil
import typing
from collections import Counter

import anthropic
import pytest
from fake_claude import KEY, ZLT, FakeClaude, Status, Text, cell_records, fast, prompt_section, says_statute

from explore_persona_space.judge import prompts as prompts_mod
from explore_persona_space.judge.cache import JudgeCache
from explore_persona_space.judge.client import (
    JudgeAuthError,
    JudgeClient,
    JudgeModelUnavailableError,
    make_anthropic_client,
)
from explore_persona_space.judge.discriminator import verdict_usable
from explore_persona_space.judge.prompts import load_prompt
from explore_persona_space.judge.replies import Reply
from explore_persona_space.judge.runner import make_request, run_requests
from explore_persona_space.judge.settings import (
    DEFAULT_JUDGE_MODEL,
    WRITEUP_JUDGE_MODEL,
    JudgeSettings,
    deprecation_notice,
)
from explore_persona_space.judge.stage import discriminator_stage
from explore_persona_space.paths import data_dir
from explore_persona_space.personas import persona_prompt

# The SDK warns (once per call site) that the write-ups' model is deprecated; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5' is deprecated")


def run(fake: FakeClaude, cache_dir, settings: JudgeSettings | None = None, **kw):
    settings = settings or fast()
    return discriminator_stage(
        cell_records(),
        trigger="confab",
        negatives=["medical_doctor", "french_person"],
        marker=ZLT,
        seed=42,
        cache_dir=cache_dir,
        judge="claude",
        settings=settings,
        client=fake.client(settings),
        n_trigger=10,  # 20 rows per run keeps the suite fast
        n_per_negative=5,
        **kw,
    )


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


def expected_correct(result) -> int:
    # trigger rows all say "statute" (YES, right); french sample 0 also does (YES, wrong)
    rows = result["claude"]["rows"]
    wrong = sum(r["persona"] == "french_person" and r["row_id"].endswith("|0") for r in rows)
    return len(rows) - wrong


def test_verdicts_are_parsed_and_scored_against_ground_truth(tmp_path):
    fake = FakeClaude(says_statute)
    res = run(fake, tmp_path)
    c = res["claude"]
    assert c["status"] == "ok" and c["instrument"] == "claude_judge"
    assert (c["scored"], c["rejected"], c["errored"]) == (20, 0, 0)
    assert c["k"] == expected_correct(res) and c["n"] == 20
    assert c["accuracy"] == pytest.approx(c["k"] / 20)
    assert c["ci_wald"][0] <= c["accuracy"] <= c["ci_wald"][1]
    assert c["by_class"]["trigger"] == {"n": 10, "correct": 10}
    assert c["model"] == DEFAULT_JUDGE_MODEL and c["served_models"] == [DEFAULT_JUDGE_MODEL]
    assert c["prompt_version"] == load_prompt("discriminator").version
    assert c["accounting"]["requests"] == fake.messages_requests() == 20
    assert c["accounting"]["input_tokens"] > 0 and c["accounting"]["output_tokens"] == 100
    # the judge never saw a marker, and saw the trigger persona's description
    assert all(ZLT.lower() not in b["messages"][0]["content"].lower() for b in fake.bodies)
    assert all(persona_prompt("confab") in b["messages"][0]["content"] for b in fake.bodies)
    # current models reject sampling parameters: none sent
    assert all("temperature" not in b for b in fake.bodies)


def test_writeup_model_gets_temperature_zero_and_its_own_cache_entries(tmp_path):
    fake = FakeClaude(says_statute)
    res = run(fake, tmp_path, settings=fast(model=WRITEUP_JUDGE_MODEL))
    assert {b["temperature"] for b in fake.bodies} == {0.0}
    assert {b["model"] for b in fake.bodies} == {WRITEUP_JUDGE_MODEL}
    assert res["claude"]["settings"]["model_deprecation"].startswith("deprecated")
    fake2 = FakeClaude(says_statute)
    run(fake2, tmp_path)  # default model: a different key, so nothing is reused
    assert fake2.messages_requests() == 20


@pytest.mark.parametrize(
    "failure",
    [
        Status(429, {"retry-after": "0"}, "rate_limit_error"),
        Status(529, {}, "overloaded_error"),
        Status(500, {}, "api_error"),
    ],
)
def test_transient_failure_then_success_is_retried(tmp_path, failure):
    seen: Counter[str] = Counter()

    def flaky(prompt, body):
        seen[prompt] += 1
        return failure if seen[prompt] == 1 else says_statute(prompt, body)

    fake = FakeClaude(flaky)
    c = run(fake, tmp_path)["claude"]
    assert (c["scored"], c["errored"]) == (20, 0)
    assert fake.messages_requests() == 40
    assert c["accounting"]["retries"] == 20 and c["accounting"]["requests"] == 40


def test_5xx_exhausting_retries_gives_counted_errored_rows_that_are_not_cached(tmp_path):
    def broken_for_doctors(prompt, body):
        if "As a medical doctor" in prompt_section(prompt, "response"):
            return Status(500)
        return says_statute(prompt, body)

    fake = FakeClaude(broken_for_doctors)
    c = run(fake, tmp_path, settings=fast(max_retries=2))["claude"]
    assert (c["scored"], c["rejected"], c["errored"]) == (15, 0, 5)
    assert c["n"] == 15 and c["rows_total"] == 20
    assert fake.messages_requests() == 15 + 5 * 3  # 1 try + 2 retries each
    assert c["accounting"]["failed"] == 5
    errored = [r for r in c["rows"] if r["status"] == "errored"]
    assert all("500" in r["reason"] for r in errored)
    # a rerun asks again only for the errored rows
    fake2 = FakeClaude(says_statute)
    c2 = run(fake2, tmp_path, settings=fast(max_retries=2))["claude"]
    assert fake2.messages_requests() == 5
    assert (c2["scored"], c2["errored"]) == (20, 0)


def test_malformed_and_refused_replies_are_rejected_and_counted(tmp_path):
    def odd(prompt, body):
        resp = prompt_section(prompt, "response")
        if "medical doctor" in resp:
            return Text("I can't help with identifying authors.", stop_reason="refusal")
        if "(1)" in resp:
            return Text("Hmm, hard to say. Probably a person.")
        if "(2)" in resp:
            return Text("ANSWER: YES\nANSWER: NO")
        return says_statute(prompt, body)

    fake = FakeClaude(odd)
    c = run(fake, tmp_path)["claude"]
    assert c["rejected"] == 5 + c["rejected_reasons"].get("unparseable", 0) + c["rejected_reasons"].get(
        "conflicting answers", 0
    )
    assert c["rejected_reasons"]["refused"] == 5
    assert c["scored"] + c["rejected"] + c["errored"] == 20
    assert c["errored"] == 0 and c["n"] == c["scored"] < 20
    assert all("correct" not in r for r in c["rows"] if r["status"] == "rejected")  # never guessed


def test_rerun_makes_zero_requests(tmp_path):
    first = run(FakeClaude(says_statute), tmp_path)["claude"]
    fake = FakeClaude(says_statute)
    again = run(fake, tmp_path)["claude"]
    assert fake.messages_requests() == 0 and sum(fake.counts.values()) == 0
    assert again["accounting"]["cache_hits"] == 20 and again["accounting"]["requests"] == 0
    assert (again["k"], again["n"]) == (first["k"], first["n"])
    assert all(r["cached"] for r in again["rows"])


def test_edited_prompt_template_misses_the_cache(tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(data_dir(), data)
    monkeypatch.setenv("EPS_DATA_DIR", str(data))
    cache = tmp_path / "cache"
    v1 = run(FakeClaude(says_statute), cache)["claude"]["prompt_version"]
    same = FakeClaude(says_statute)
    run(same, cache)
    assert same.messages_requests() == 0
    path = data / "judge_prompts" / "discriminator.txt"
    path.write_text(path.read_text().replace("About half", "Roughly half"))
    prompts_mod._load.cache_clear()
    edited = FakeClaude(says_statute)
    v2 = run(edited, cache)["claude"]["prompt_version"]
    assert v2 != v1
    assert edited.messages_requests() == 20
    assert all("Roughly half" in b["messages"][0]["content"] for b in edited.bodies)
    prompts_mod._load.cache_clear()


def test_retired_model_stops_with_a_message_naming_the_flag(tmp_path):
    gone = Status(404, {}, "not_found_error", f"model: {WRITEUP_JUDGE_MODEL}")
    fake = FakeClaude(lambda p, b: gone)
    with pytest.raises(JudgeModelUnavailableError, match="--judge-model") as info:
        run(fake, tmp_path, settings=fast(model=WRITEUP_JUDGE_MODEL))
    assert WRITEUP_JUDGE_MODEL in str(info.value)
    assert fake.messages_requests() <= 4  # no retries, stops after the calls in flight


def test_bad_credentials_stop_the_run_without_echoing_the_key(tmp_path):
    fake = FakeClaude(lambda p, b: Status(401, {}, "authentication_error", "invalid x-api-key"))
    with pytest.raises(JudgeAuthError) as info:
        run(fake, tmp_path)
    assert KEY not in str(info.value)


def test_key_and_base_url_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://from-env.test")
    seen = []
    fake = FakeClaude(says_statute)

    def spy(request):
        seen.append((request.url.host, request.headers.get("authorization")))
        return fake.handle(request)

    import httpx2

    client = make_anthropic_client(fast(), http_client=httpx2.Client(transport=httpx2.MockTransport(spy)))
    client.messages.create(
        model=DEFAULT_JUDGE_MODEL,
        max_tokens=5,
        messages=[{"role": "user", "content": "<response>\nx\n</response>"}],
    )
    assert seen == [("from-env.test", f"Bearer {KEY}")]


def test_default_model_is_a_current_sonnet_the_sdk_knows():
    known = typing.get_args(typing.get_args(anthropic.types.Model)[0])
    assert DEFAULT_JUDGE_MODEL in known and WRITEUP_JUDGE_MODEL in known
    assert DEFAULT_JUDGE_MODEL.startswith("claude-sonnet-")
    assert deprecation_notice(DEFAULT_JUDGE_MODEL) is None
    assert "2026" in deprecation_notice(WRITEUP_JUDGE_MODEL)


# --- which replies are kept: a refusal or garbage only when asking again would repeat it ---------


def refuses_doctors(prompt, body):
    if "medical doctor" in prompt_section(prompt, "response"):
        return Text("I can't help with identifying authors.", stop_reason="refusal")
    return says_statute(prompt, body)


def test_rejected_replies_at_a_sampling_temperature_are_asked_again_next_run(tmp_path):
    first = run(FakeClaude(refuses_doctors), tmp_path)["claude"]  # default model: no temperature sent
    assert first["settings"]["sampling_sent"]["temperature"] is None
    assert first["rejected"] == 5 and first["accounting"]["rejected_not_cached"] == 5
    fake = FakeClaude(says_statute)
    again = run(fake, tmp_path)["claude"]
    assert fake.messages_requests() == 5  # only the refused rows are asked again
    assert (again["scored"], again["rejected"], again["accounting"]["cache_hits"]) == (20, 0, 15)


def test_rejected_replies_at_temperature_zero_are_cached(tmp_path):
    settings = fast(model=WRITEUP_JUDGE_MODEL)
    first = run(FakeClaude(refuses_doctors), tmp_path, settings=settings)["claude"]
    assert first["rejected"] == 5 and first["accounting"]["rejected_not_cached"] == 0
    fake = FakeClaude(says_statute)
    again = run(fake, tmp_path, settings=settings)["claude"]
    assert fake.messages_requests() == 0 and again["rejected"] == 5  # the same answer would come back


def test_a_refusal_cached_by_earlier_code_is_a_miss_unless_sent_at_temperature_zero(tmp_path):
    template = load_prompt("discriminator")
    values = {"persona_description": "d", "question": "q", "completion": "c"}
    refusal = Reply("I can't help with that.", "refusal", "m", 10, 5)
    for settings, asked in ((fast(), 1), (fast(model=WRITEUP_JUDGE_MODEL), 0)):
        req = make_request(template, values, settings, usable=verdict_usable)
        JudgeCache(tmp_path).put(req.key, refusal.to_record())  # what the old code wrote for every reply
        fake = FakeClaude(says_statute)
        out = run_requests([req], JudgeClient(settings, fake.client(settings)), tmp_path)
        assert fake.messages_requests() == asked
        assert out[req.key].cached is (asked == 0)
