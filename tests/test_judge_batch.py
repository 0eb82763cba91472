"""The Message Batches path: submit once, survive a crash, resume the same batch."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from fake_claude import KEY, ZLT, FakeClaude, Status, Text, cell_records, fast, prompt_section, says_statute

from explore_persona_space.judge.batch import LOOKUP_DELAYS_S, BatchNotFinishedError
from explore_persona_space.judge.client import JudgeClient, JudgeModelUnavailableError, make_anthropic_client
from explore_persona_space.judge.discriminator import run_claude_discriminator, sample_rows


class Crash(BaseException):
    """Stands in for the process dying (a BaseException: the SDK wraps an Exception as a connection error)."""


def crash(_seconds: float) -> None:
    raise Crash


def run_batch_stage(fake, cache_dir, *, sleep=lambda s: None, max_wait_s=None):
    """The Claude discriminator on the batch path, with an injectable sleep between polls."""
    settings = fast()
    rows, _ = sample_rows(
        cell_records(),
        trigger="confab",
        negatives=["medical_doctor", "french_person"],
        markers=[ZLT],
        seed=42,
        n_trigger=10,
        n_per_negative=5,
    )
    judge = JudgeClient(settings, fake.client(settings), sleep=sleep)
    return run_claude_discriminator(
        rows,
        trigger="confab",
        judge=judge,
        cache_dir=cache_dir,
        batch=True,
        poll_interval_s=0.0,
        max_wait_s=max_wait_s,
    )


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


def test_batch_submitted_then_crashed_is_resumed_not_resubmitted(tmp_path):
    fake = FakeClaude(says_statute, polls_before_end=2)
    with pytest.raises(Crash):
        run_batch_stage(fake, tmp_path, sleep=crash)  # dies after the first poll
    assert fake.counts["POST /v1/messages/batches"] == 1
    states = list((tmp_path / "batches").glob("batch-*.json"))
    assert len(states) == 1
    state = json.loads(states[0].read_text())
    assert state["batch_id"] == "msgbatch_0001" and len(state["keys"]) == 20
    assert KEY not in states[0].read_text()

    # a new process: same inputs, same endpoint (the batch lives server-side)
    res = run_batch_stage(fake, tmp_path)
    assert fake.counts["POST /v1/messages/batches"] == 1  # not submitted again
    assert fake.counts["GET /v1/messages/batches/{id}/results"] == 1
    assert fake.messages_requests() == 0
    c = res
    assert (c["scored"], c["rejected"], c["errored"]) == (20, 0, 0)
    assert c["accounting"]["batch_ids"] == ["msgbatch_0001"]
    assert c["accounting"]["output_tokens"] == 100
    assert not list((tmp_path / "batches").glob("batch-*.json"))  # done: state removed

    # and the replies are cached: a third run sends nothing at all
    fake3 = FakeClaude(says_statute)
    again = run_batch_stage(fake3, tmp_path)
    assert sum(fake3.counts.values()) == 0
    assert again["k"] == c["k"]


def test_batch_still_processing_after_max_wait_keeps_its_state(tmp_path):
    fake = FakeClaude(says_statute, polls_before_end=10**6)
    with pytest.raises(BatchNotFinishedError, match="rerun"):
        run_batch_stage(fake, tmp_path, sleep=lambda s: None, max_wait_s=0.0)
    assert len(list((tmp_path / "batches").glob("batch-*.json"))) == 1
    fake.polls_before_end = 0
    res = run_batch_stage(fake, tmp_path)
    assert fake.counts["POST /v1/messages/batches"] == 1
    assert res["scored"] == 20


def test_errored_batch_entries_are_counted_and_asked_again_next_time(tmp_path):
    def doctors_fail(prompt, body):
        if "medical doctor" in prompt_section(prompt, "response"):
            return Status(500)
        return Text("ANSWER: NO")

    fake = FakeClaude(doctors_fail, polls_before_end=0)
    c = run_batch_stage(fake, tmp_path)
    assert (c["scored"], c["errored"]) == (15, 5)
    assert all(r["reason"].startswith("batch entry errored") for r in c["rows"] if r["status"] == "errored")
    fake2 = FakeClaude(says_statute, polls_before_end=0)
    run_batch_stage(fake2, tmp_path)
    assert len(fake2.batches["msgbatch_0001"]["requests"]) == 5  # only the errored ones


# --- creates with an unclear outcome: find the batch, never pay twice ---------------------------


def test_create_timing_out_after_the_server_accepted_it_is_found_not_resent(tmp_path, caplog):
    fake = FakeClaude(says_statute, polls_before_end=0)
    fake.create_faults = ["accept_then_timeout"]
    res = run_batch_stage(fake, tmp_path)
    assert fake.creates() == 1 and list(fake.batches) == ["msgbatch_0001"]  # one create, one batch
    assert fake.counts["GET /v1/messages/batches"] >= 1  # it looked before doing anything else
    assert (res["scored"], res["errored"]) == (20, 0)
    acc = res["accounting"]
    assert acc["batch_ids"] == ["msgbatch_0001"] and acc["batch_create_attempts"] == 1
    assert acc["batch_possible_duplicates"] == []
    assert "unclear: APITimeoutError" in caplog.text
    assert not list((tmp_path / "batches").glob("batch-*.json"))


def test_loopback_server_create_reply_arriving_after_the_client_timeout_makes_one_batch(tmp_path, caplog):
    """A real socket: the server stores the batch, then answers after the SDK's read timeout has fired."""
    fake = FakeClaude(says_statute, polls_before_end=0)
    fake.create_faults = ["accept_then_timeout"]
    fake.stall_s = 1.5
    settings = fast(timeout_s=0.5)
    rows, _ = sample_rows(
        cell_records(), trigger="confab", negatives=["medical_doctor", "french_person"], markers=[ZLT],
        seed=42, n_trigger=10, n_per_negative=5,
    )  # fmt: skip
    with fake.serve() as url:
        client = make_anthropic_client(settings, api_key="test-key", base_url=url)
        judge = JudgeClient(settings, client, sleep=lambda s: None)
        res = run_claude_discriminator(
            rows, trigger="confab", judge=judge, cache_dir=tmp_path, batch=True, poll_interval_s=0.0
        )
    assert "unclear: APITimeoutError" in caplog.text  # the SDK's own timeout, over a real connection
    assert fake.creates() == 1 and len(fake.batches) == 1
    assert res["accounting"]["batch_ids"] == ["msgbatch_0001"]
    assert (res["scored"], res["errored"]) == (20, 0)


def test_create_that_timed_out_before_the_server_took_it_is_sent_again_after_looking(tmp_path):
    fake = FakeClaude(says_statute, polls_before_end=0)
    fake.create_faults = ["timeout"]  # nothing created, no reply
    slept = []
    res = run_batch_stage(fake, tmp_path, sleep=slept.append)
    assert fake.creates() == 2 and list(fake.batches) == ["msgbatch_0001"]
    # a listing after each pause; after the resend, one more for a late acceptance of the first
    assert fake.counts["GET /v1/messages/batches"] == len(LOOKUP_DELAYS_S) + 1
    assert [s for s in slept if s > 0] == [d for d in LOOKUP_DELAYS_S if d > 0]
    assert res["accounting"]["batch_create_attempts"] == 2 and res["scored"] == 20


def test_a_same_size_batch_of_someone_else_in_the_window_is_verified_and_passed_over(tmp_path):
    fake = FakeClaude(says_statute, polls_before_end=0)
    foreign = [
        {"custom_id": f"{i:064x}", "params": {"model": "m", "max_tokens": 5, "messages": [{"role": "user",
         "content": "<response>\nstatute\n</response>"}]}}
        for i in range(20)
    ]  # fmt: skip
    old = fake.add_batch(foreign)
    fake.batches[old]["created_at"] -= timedelta(hours=2)  # before the window: never a candidate
    other = fake.add_batch(foreign)  # same size, created just now by someone else
    fake.create_faults = ["accept_then_timeout"]
    res = run_batch_stage(fake, tmp_path)
    ours = [b for b in fake.batches if b not in (old, other)]
    assert fake.creates() == 1 and len(ours) == 1
    assert res["accounting"]["batch_ids"] == ours and res["scored"] == 20
    assert fake.counts["GET /v1/messages/batches/{id}/results"] == 2  # the other batch's, then ours
    assert not any(old in url for url in fake.urls)  # the one from before the window: never polled


def test_a_process_that_died_while_creating_finds_its_batch_on_the_rerun(tmp_path):
    fake = FakeClaude(says_statute, polls_before_end=0)
    served = fake.handle

    def dies_after_create(request):
        response = served(request)
        if request.method == "POST" and request.url.path == "/v1/messages/batches":
            raise Crash  # the batch exists server-side; this process never sees the reply
        return response

    fake.handle = dies_after_create
    with pytest.raises(Crash):
        run_batch_stage(fake, tmp_path)
    state = json.loads(next((tmp_path / "batches").glob("batch-*.json")).read_text())
    assert state["batch_id"] is None and state["attempts"][-1]["outcome"] == "sending"  # recorded first
    fake.handle = served
    res = run_batch_stage(fake, tmp_path)
    assert fake.creates() == 1 and list(fake.batches) == ["msgbatch_0001"]
    assert res["accounting"]["batch_ids"] == ["msgbatch_0001"] and res["scored"] == 20


def test_rate_limited_create_is_retried_and_a_502_after_acceptance_is_looked_up(tmp_path):
    fake = FakeClaude(says_statute, polls_before_end=0)
    fake.create_faults = ["429", "accept_then_502"]
    res = run_batch_stage(fake, tmp_path)
    assert fake.creates() == 2 and list(fake.batches) == ["msgbatch_0001"]  # the 429 created nothing
    assert res["accounting"]["retries"] == 1 and res["scored"] == 20


def test_a_create_accepted_after_the_lookups_gave_up_is_reported_as_a_possible_duplicate(tmp_path):
    fake = FakeClaude(says_statute, polls_before_end=0)
    fake.create_faults = ["timeout"]
    served, late = fake.handle, []

    def late_acceptance(request):
        if request.method == "POST" and request.url.path == "/v1/messages/batches" and fake.creates() == 1:
            late.append(fake.add_batch(json.loads(request.content)["requests"]))  # the first one, late
        return served(request)

    fake.handle = late_acceptance
    res = run_batch_stage(fake, tmp_path)
    assert len(fake.batches) == 2 and late == ["msgbatch_0001"]
    assert res["accounting"]["batch_ids"] == ["msgbatch_0002"]
    assert res["accounting"]["batch_possible_duplicates"] == ["msgbatch_0001"]  # recorded, never silent


@pytest.mark.parametrize("how", ["unknown", "retired"])
def test_batch_mode_stops_on_an_unknown_or_retired_model_before_any_spend(tmp_path, how):
    fake = FakeClaude(says_statute)
    model = fast().model
    if how == "unknown":
        fake.unknown_models.add(model)
    else:
        fake.models[model] = "retired"
    with pytest.raises(JudgeModelUnavailableError, match="--judge-model"):
        run_batch_stage(fake, tmp_path)
    assert fake.counts["GET /v1/models/{model}"] == 1  # one look, no retries
    assert fake.creates() == 0 and fake.messages_requests() == 0 and not fake.batches
    assert not list((tmp_path / "batches").glob("batch-*.json"))


def test_a_state_file_of_the_first_version_is_resumed_not_resubmitted(tmp_path):
    fake = FakeClaude(says_statute, polls_before_end=2)
    with pytest.raises(Crash):
        run_batch_stage(fake, tmp_path, sleep=crash)
    path = next((tmp_path / "batches").glob("batch-*.json"))
    new = json.loads(path.read_text())
    first_version = {"schema": 1, "batch_id": new["batch_id"], "model": new["model"], "keys": new["keys"]}
    path.write_text(json.dumps({**first_version, "submitted_utc": "2026-01-01T00:00:00+00:00"}))
    res = run_batch_stage(fake, tmp_path)
    assert fake.creates() == 1 and res["accounting"]["batch_ids"] == ["msgbatch_0001"]
    assert res["scored"] == 20


def test_batch_refusals_at_a_sampling_temperature_are_not_cached(tmp_path):
    def refuses_doctors(prompt, body):
        if "medical doctor" in prompt_section(prompt, "response"):
            return Text("I can't say.", stop_reason="refusal")
        return says_statute(prompt, body)

    first = run_batch_stage(FakeClaude(refuses_doctors, polls_before_end=0), tmp_path)
    assert first["rejected"] == 5 and first["accounting"]["rejected_not_cached"] == 5
    fake = FakeClaude(says_statute, polls_before_end=0)
    again = run_batch_stage(fake, tmp_path)
    assert len(fake.batches["msgbatch_0001"]["requests"]) == 5 and again["scored"] == 20
