"""How a judge batch comes to exist, and how its id is never lost: the state file, create, lookup.

A submitted batch is paid for whether or not this process lives to learn its id,
so everything about a submission goes to a state file (written atomically)
*before* the request is sent, and the id the moment it is known. The state file
is named by a hash of the set of cache keys it covers, so a rerun after a crash
finds it.

Creating a batch is not idempotent, so a create is sent again only after an
answer that says nothing was created (429, 529 overloaded, 408, 409). A timeout,
a dropped connection or another 5xx leaves the outcome unclear: the server may
have accepted the batch and lost only the reply. The API has no idempotency key
and batches carry no user metadata, so an unclear create is resolved by
*finding* the batch:

1. Before the first create, the judge model is checked on the free Models API
   (an unknown or retired model stops the run here, before any spend), and the
   server's clock from that reply's ``Date`` header, less a margin, is recorded
   as ``created_after``: our batch cannot have been created before it.
2. After an unclear create, ``batches.list`` (newest first) is read back to
   ``created_after``; a *candidate* is a batch created since then whose request
   counts sum to our number of requests (the API guarantees the sum equals the
   batch size) and that no other state file in the directory has claimed. The
   listing is repeated after ``lookup_delays_s`` pauses, since a create still in
   flight on the server may be accepted after the client gave up.
3. Size and time alone cannot tell our batch from a same-sized one that someone
   else created in the same minutes, and an unfinished batch shows neither its
   requests nor its custom_ids. So the caller (``batch.run_batch``) *verifies* a
   candidate once it has ended: its results must carry exactly our custom_ids.
   That download is needed for our own results anyway; a candidate that is not
   ours costs one download of someone else's results, which only happens when
   an unclear create coincides with a same-sized foreign batch.
4. Nothing found after all the pauses: the create did not take, and the next
   attempt is recorded and sent. Should the unclear one still be accepted later,
   a listing after the successful create reports it as a possible duplicate
   (logged and counted), never silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anthropic

from explore_persona_space.judge.replies import JudgeRequest
from explore_persona_space.results import atomic_write_json

if TYPE_CHECKING:
    from explore_persona_space.judge.client import JudgeClient

log = logging.getLogger(__name__)

STATE_SCHEMA = 2
# The API answered and created nothing; the same create may be sent again after a backoff.
_CLEAR_RETRY = frozenset({408, 409, 429, 529})
SERVER_CLOCK_MARGIN_S = 120.0  # the Date header has 1 s resolution; servers' clocks differ a little
LOCAL_CLOCK_MARGIN_S = 900.0  # without a Date header, our own clock, which may be off by more
LOOKUP_DELAYS_S = (0.0, 30.0, 120.0)
LIST_PAGE = 100


class BatchSubmitError(RuntimeError):
    """No create attempt produced a batch; the state file keeps every attempt for the next run."""


def state_path(state_dir: Path, keys: Sequence[str]) -> Path:
    digest = hashlib.sha256("\n".join(sorted(keys)).encode("ascii")).hexdigest()[:24]
    return Path(state_dir) / f"batch-{digest}.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_state(keys: Sequence[str], model: str) -> dict[str, Any]:
    return {
        "schema": STATE_SCHEMA,
        "model": model,
        "keys": list(keys),
        "n_requests": len(keys),
        "batch_id": None,
        "created_after": None,
        "attempts": [],  # {"sent_utc", "outcome": sending | accepted | rejected: ... | unclear: ...}
        "candidates": [],  # listed batches that may be ours, oldest first, to verify
        "not_ours": [],  # candidates whose results carried other custom_ids
    }


def read_state(path: Path, keys: Sequence[str]) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("batch state %s is unreadable (%s); starting a new submission", path, exc)
        return None
    if not isinstance(state, dict) or sorted(state.get("keys", [])) != sorted(keys):
        log.warning("batch state %s does not describe these requests; starting a new submission", path)
        return None
    if state.get("schema") == 1 and state.get("batch_id"):  # written by the first version: id known
        fresh = new_state(keys, str(state.get("model")))
        fresh["batch_id"] = str(state["batch_id"])
        fresh["attempts"] = [{"sent_utc": state.get("submitted_utc"), "outcome": "accepted"}]
        return fresh
    if state.get("schema") != STATE_SCHEMA:
        log.warning("batch state %s has an unknown schema; starting a new submission", path)
        return None
    return state


def save_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_json(path, state)


def _claimed_elsewhere(path: Path) -> set[str]:
    """Batch ids that other state files in the directory know to be theirs."""
    claimed = set()
    for other in Path(path).parent.glob("batch-*.json"):
        if other.name == Path(path).name:
            continue
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            batch_id = json.loads(other.read_text(encoding="utf-8")).get("batch_id")
            if batch_id:
                claimed.add(str(batch_id))
    return claimed


# --- submitting ----------------------------------------------------------------------------------


def _unclear(state: dict[str, Any]) -> bool:
    """An earlier create was sent and its outcome never learned (unclear, or the process died)."""
    return any(a["outcome"] == "sending" or a["outcome"].startswith("unclear") for a in state["attempts"])


def _classify(judge: JudgeClient, exc: anthropic.APIError) -> tuple[str, bool]:
    """(outcome, retry) for a failed create; fatal answers raise their own error."""
    if isinstance(exc, anthropic.APIConnectionError):  # includes APITimeoutError
        return f"unclear: {type(exc).__name__}", False
    if not isinstance(exc, anthropic.APIStatusError):
        return f"unclear: {type(exc).__name__}", False
    status = exc.status_code
    if status >= 500 and status != 529:  # a gateway or the server failed; the batch may exist
        return f"unclear: HTTP {status}", False
    if status in (401, 403):
        raise judge.auth_error("batches.create", exc) from None
    return f"rejected: HTTP {status}", status in _CLEAR_RETRY


def list_candidates(judge: JudgeClient, path: Path, state: dict[str, Any]) -> list[str]:
    """Batches created since ``created_after`` with our request count, not claimed elsewhere, oldest first."""
    acc = judge.accounting
    after = datetime.fromisoformat(state["created_after"])
    skip = _claimed_elsewhere(path) | set(state["not_ours"])
    n = state["n_requests"]
    found: list[str] = []
    page = judge.with_retries(
        lambda: judge.client.messages.batches.list(limit=LIST_PAGE),
        what="batches.list",
        on_attempt=lambda: acc.add(batch_http_requests=1),
    )
    acc.add(batch_lookups=1)
    while True:
        for b in page.data:
            if b.created_at < after:
                return found[::-1]
            counts = b.request_counts
            total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if total == n and b.id not in skip:
                found.append(b.id)
        if not page.has_next_page():
            return found[::-1]
        page = judge.with_retries(
            page.get_next_page, what="batches.list", on_attempt=lambda: acc.add(batch_http_requests=1)
        )


def _look(judge: JudgeClient, path: Path, state: dict[str, Any], delays: Sequence[float]) -> bool:
    for delay in delays:
        if delay > 0:
            log.info("judge batch: no batch of ours listed yet; looking again in %.0f s", delay)
            judge.sleep(delay)
        found = list_candidates(judge, path, state)
        if found:
            state["candidates"] = found
            save_state(path, state)
            log.warning(
                "judge batch: a create had an unclear outcome; %d listed batch(es) may be ours: %s "
                "(each is verified by its custom_ids once it ends)",
                len(found),
                ", ".join(found),
            )
            return True
    return False


def _created_after(judge: JudgeClient) -> str:
    server_now = judge.check_model()
    if server_now is not None:
        start = server_now - timedelta(seconds=SERVER_CLOCK_MARGIN_S)
    else:
        start = datetime.now(UTC) - timedelta(seconds=LOCAL_CLOCK_MARGIN_S)
    return start.astimezone(UTC).isoformat(timespec="seconds")


def submit(
    pending: Sequence[JudgeRequest], judge: JudgeClient, path: Path, state: dict[str, Any], delays
) -> None:
    """Leave ``state`` with a ``batch_id`` or ``candidates``; raise when no attempt produced a batch."""
    if _unclear(state) and _look(judge, path, state, delays):  # an earlier process sent one: look first
        return
    # model check first: nothing is paid for a model the API does not serve
    created_after = _created_after(judge)
    state["created_after"] = state["created_after"] or created_after
    requests = [{"custom_id": r.key, "params": judge.request_params(r.prompt)} for r in pending]
    s, acc = judge.settings, judge.accounting
    for attempt in range(s.max_retries + 1):
        state["attempts"].append({"sent_utc": _now(), "outcome": "sending"})
        save_state(path, state)  # recorded before it is sent
        acc.add(batch_http_requests=1, batch_create_attempts=1)
        try:
            batch = judge.client.messages.batches.create(requests=requests)
        except anthropic.APIError as exc:
            outcome, retry = _classify(judge, exc)
            state["attempts"][-1]["outcome"] = outcome
            save_state(path, state)
            log.warning("judge batch create attempt %d: %s", attempt + 1, outcome)
            if outcome.startswith("unclear"):
                if _look(judge, path, state, delays):
                    return
                continue  # nothing of ours is listed: that attempt created no batch
            if not retry:
                raise
            if attempt < s.max_retries:
                acc.add(retries=1)
                judge.sleep(min(s.backoff_base_s * 2**attempt, s.backoff_max_s))
            continue
        state["attempts"][-1]["outcome"] = "accepted"
        state["batch_id"] = batch.id
        save_state(path, state)
        log.info("judge batch %s submitted (%d requests); state in %s", batch.id, len(requests), path)
        if len(state["attempts"]) > 1 and _unclear(state):
            _report_possible_duplicates(judge, path, state)
        return
    raise BatchSubmitError(
        f"judge batch: no create attempt produced a batch ({[a['outcome'] for a in state['attempts']]}); "
        f"the attempts are recorded in {path}, and a rerun looks for them before sending another"
    )


def _report_possible_duplicates(judge: JudgeClient, path: Path, state: dict[str, Any]) -> None:
    others = [b for b in list_candidates(judge, path, state) if b != state["batch_id"]]
    if others:
        judge.accounting.batch_possible_duplicates.extend(others)
        log.warning(
            "judge batch %s: an earlier create's outcome was unclear, and batch(es) %s of the same size were "
            "created since; they may be duplicates of it (cancel them if so)",
            state["batch_id"],
            ", ".join(others),
        )
