"""The Message Batches path (``--judge-batch``): half price, hours of latency.

A rerun after a crash builds the same set of pending requests (nothing of it
reached the cache), finds the state file :mod:`batch_submit` wrote before it
sent anything, and polls the batch it already paid for instead of submitting
another; how a create with an unclear outcome is resolved without paying twice
is told there. Once the results are stored the state file is removed; a rerun
then hits the cache, and only prompts whose batch entry errored (or whose reply
was not kept, see :mod:`runner`) are asked again.

``custom_id`` is the request's cache key (64 hex characters, within the API's
limit), so results map back to prompts without a second table.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explore_persona_space.judge.batch_submit import (
    LOOKUP_DELAYS_S,
    new_state,
    read_state,
    save_state,
    state_path,
    submit,
)
from explore_persona_space.judge.replies import CallResult, JudgeRequest, Reply

if TYPE_CHECKING:
    from explore_persona_space.judge.client import JudgeClient

log = logging.getLogger(__name__)

__all__ = ["LOOKUP_DELAYS_S", "BatchNotFinishedError", "run_batch", "state_path"]

Store = Callable[[JudgeRequest, Reply], None]


class BatchNotFinishedError(RuntimeError):
    """The batch is still processing after ``max_wait_s``; rerun to resume polling it."""


def _retrieve(judge: JudgeClient, batch_id: str) -> Any:
    return judge.with_retries(
        lambda: judge.client.messages.batches.retrieve(batch_id),
        what="batches.retrieve",
        on_attempt=lambda: judge.accounting.add(batch_http_requests=1),
    )


def _check_patience(batch: Any, start: float, max_wait_s: float | None) -> None:
    waited = time.monotonic() - start
    if max_wait_s is not None and waited >= max_wait_s:
        raise BatchNotFinishedError(
            f"judge batch {batch.id} is still {batch.processing_status} after {waited:.0f} s "
            f"({batch.request_counts.processing} requests processing); rerun the same command to "
            "resume polling it - it will not be submitted again"
        )


def _wait(judge: JudgeClient, batch_id: str, poll_interval_s: float, max_wait_s: float | None) -> None:
    start = time.monotonic()
    while (batch := _retrieve(judge, batch_id)).processing_status != "ended":
        _check_patience(batch, start, max_wait_s)
        judge.sleep(poll_interval_s)


def _fetch(judge: JudgeClient, batch_id: str) -> list[Any]:
    return judge.with_retries(
        lambda: list(judge.client.messages.batches.results(batch_id)),
        what="batches.results",
        # results() retrieves the batch for its results_url, then downloads: two requests
        on_attempt=lambda: judge.accounting.add(batch_http_requests=2),
    )


def _adopt(judge: JudgeClient, path: Path, state: dict[str, Any], batch_id: str) -> None:
    others = [c for c in state["candidates"] if c != batch_id]
    state["batch_id"], state["candidates"] = batch_id, []
    save_state(path, state)
    log.info("judge batch %s: found after an unclear create, verified by its custom_ids", batch_id)
    if others:
        judge.accounting.batch_possible_duplicates.extend(others)
        log.warning("judge batch %s is ours; same-size batches left unverified: %s", batch_id, others)


def _verify(
    judge: JudgeClient, path: Path, state: dict[str, Any], keys: set[str], poll_s: float, max_wait_s
) -> list[Any] | None:
    """Results of the candidate whose custom_ids are exactly ours; None once every candidate is not ours.

    All candidates are polled together, so a slow batch of someone else's does not hold ours up.
    """
    start = time.monotonic()
    while state["candidates"]:
        for candidate in list(state["candidates"]):
            batch = _retrieve(judge, candidate)
            if batch.processing_status != "ended":
                continue
            entries = _fetch(judge, candidate)
            if {e.custom_id for e in entries} == keys:
                _adopt(judge, path, state, candidate)
                return entries
            log.info("judge batch %s has the same size but other custom_ids: not ours", candidate)
            state["candidates"].remove(candidate)
            state["not_ours"].append(candidate)
            save_state(path, state)
        if state["candidates"]:
            _check_patience(batch, start, max_wait_s)
            judge.sleep(poll_s)
    return None


def _to_results(judge: JudgeClient, entries: Sequence[Any], keys: set[str]) -> dict[str, CallResult]:
    acc = judge.accounting
    out: dict[str, CallResult] = {}
    for entry in entries:
        if entry.custom_id not in keys:
            continue
        result = entry.result
        if result.type == "succeeded":
            reply = Reply.from_message(result.message)
            acc.add_reply(reply)
            out[entry.custom_id] = CallResult(reply=reply)
        else:
            detail = getattr(getattr(result, "error", None), "error", None)
            acc.add(failed=1)
            out[entry.custom_id] = CallResult(reply=None, error=f"batch entry {result.type}: {detail}"[:500])
    for key in keys - out.keys():
        acc.add(failed=1)
        out[key] = CallResult(reply=None, error="batch returned no result for this request")
    return out


def run_batch(
    pending: Sequence[JudgeRequest],
    judge: JudgeClient,
    store: Store,
    *,
    state_dir: Path,
    poll_interval_s: float = 30.0,
    max_wait_s: float | None = None,
    lookup_delays_s: Sequence[float] = LOOKUP_DELAYS_S,
) -> dict[str, CallResult]:
    """Submit (or find, or resume) one batch for ``pending``; ``store`` keeps each reply it is given."""
    keys = [r.key for r in pending]
    path = state_path(state_dir, keys)
    state = read_state(path, keys)
    if state is None:
        state = new_state(keys, judge.settings.model)
    elif state["batch_id"]:
        log.info("judge batch %s: resuming (%s)", state["batch_id"], state["attempts"][-1:])
    elif state["candidates"]:
        log.info("judge batch: resuming the check of %s after an unclear create", state["candidates"])
    entries = None
    while entries is None:
        if state["batch_id"] is None and not state["candidates"]:
            submit(pending, judge, path, state, lookup_delays_s)
        if state["batch_id"] is not None:
            _wait(judge, state["batch_id"], poll_interval_s, max_wait_s)
            entries = _fetch(judge, state["batch_id"])
        else:
            entries = _verify(judge, path, state, set(keys), poll_interval_s, max_wait_s)
    judge.accounting.batch_ids.append(state["batch_id"])
    out = _to_results(judge, entries, set(keys))
    by_key = {r.key: r for r in pending}
    for key, res in out.items():
        if res.reply is not None:
            store(by_key[key], res.reply)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return out
