"""The Message Batches path (``--judge-batch``): half price, hours of latency.

A submitted batch is paid for whether or not this process lives to read it, so
its id is written to a state file (atomically) before the first poll. The state
file is named by a hash of the set of cache keys it covers: a rerun after a
crash builds the same set (nothing of it reached the cache) and finds the file,
so it polls the batch it already paid for instead of submitting another. Once
the results are in the cache the state file is removed; a rerun then hits the
cache, and only prompts whose batch entry errored are asked again.

``custom_id`` is the request's cache key (64 hex characters, within the API's
limit), so results map back to prompts without a second table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explore_persona_space.judge.cache import JudgeCache
from explore_persona_space.judge.replies import CallResult, JudgeRequest, Reply
from explore_persona_space.results import atomic_write_json

if TYPE_CHECKING:
    from explore_persona_space.judge.client import JudgeClient

log = logging.getLogger(__name__)

STATE_SCHEMA = 1


class BatchNotFinishedError(RuntimeError):
    """The batch is still processing after ``max_wait_s``; rerun to resume polling it."""


def state_path(state_dir: Path, keys: Sequence[str]) -> Path:
    digest = hashlib.sha256("\n".join(sorted(keys)).encode("ascii")).hexdigest()[:24]
    return Path(state_dir) / f"batch-{digest}.json"


def _read_state(path: Path, keys: Sequence[str]) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("batch state %s is unreadable (%s); submitting a new batch", path, exc)
        return None
    if state.get("schema") != STATE_SCHEMA or sorted(state.get("keys", [])) != sorted(keys):
        log.warning("batch state %s does not describe these requests; submitting a new batch", path)
        return None
    return state


def _submit(pending: Sequence[JudgeRequest], judge: JudgeClient, path: Path) -> str:
    requests = [{"custom_id": r.key, "params": judge.request_params(r.prompt)} for r in pending]
    acc = judge.accounting
    batch = judge.with_retries(
        lambda: judge.client.messages.batches.create(requests=requests),
        what="batches.create",
        on_attempt=lambda: acc.add(batch_http_requests=1),
    )
    atomic_write_json(
        path,
        {
            "schema": STATE_SCHEMA,
            "batch_id": batch.id,
            "model": judge.settings.model,
            "submitted_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "keys": [r.key for r in pending],
        },
    )
    log.info("judge batch %s submitted (%d requests); state in %s", batch.id, len(requests), path)
    return batch.id


def _wait(judge: JudgeClient, batch_id: str, poll_interval_s: float, max_wait_s: float | None) -> None:
    acc = judge.accounting
    start = time.monotonic()
    while True:
        batch = judge.with_retries(
            lambda: judge.client.messages.batches.retrieve(batch_id),
            what="batches.retrieve",
            on_attempt=lambda: acc.add(batch_http_requests=1),
        )
        if batch.processing_status == "ended":
            return
        waited = time.monotonic() - start
        if max_wait_s is not None and waited >= max_wait_s:
            raise BatchNotFinishedError(
                f"judge batch {batch_id} is still {batch.processing_status} after {waited:.0f} s "
                f"({batch.request_counts.processing} requests processing); rerun the same command to "
                "resume polling it - it will not be submitted again"
            )
        judge.sleep(poll_interval_s)


def _collect(judge: JudgeClient, batch_id: str, keys: set[str]) -> dict[str, CallResult]:
    acc = judge.accounting
    entries = judge.with_retries(
        lambda: list(judge.client.messages.batches.results(batch_id)),
        what="batches.results",
        # results() retrieves the batch for its results_url, then downloads: two requests
        on_attempt=lambda: acc.add(batch_http_requests=2),
    )
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
    cache: JudgeCache | None,
    *,
    state_dir: Path,
    poll_interval_s: float = 30.0,
    max_wait_s: float | None = None,
) -> dict[str, CallResult]:
    keys = [r.key for r in pending]
    path = state_path(state_dir, keys)
    state = _read_state(path, keys)
    if state is not None:
        batch_id = str(state["batch_id"])
        log.info("judge batch %s: resuming (submitted %s)", batch_id, state.get("submitted_utc"))
    else:
        batch_id = _submit(pending, judge, path)
    judge.accounting.batch_ids.append(batch_id)
    _wait(judge, batch_id, poll_interval_s, max_wait_s)
    out = _collect(judge, batch_id, set(keys))
    if cache is not None:
        for key, res in out.items():
            if res.reply is not None:
                cache.put(key, res.reply.to_record())
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return out
