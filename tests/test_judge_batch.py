"""The Message Batches path: submit once, survive a crash, resume the same batch."""

from __future__ import annotations

import json

import pytest
from fake_claude import KEY, ZLT, FakeClaude, Status, Text, cell_records, fast, prompt_section, says_statute

from explore_persona_space.judge.batch import BatchNotFinishedError
from explore_persona_space.judge.client import JudgeClient
from explore_persona_space.judge.discriminator import run_claude_discriminator, sample_rows


class Crash(Exception):
    """Stands in for the process dying while it waits for the batch."""


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
