"""Run many judge prompts: cache first, then bounded concurrent calls or one batch.

Each prompt gets one ``CallResult`` keyed by its cache key: a reply (fresh or
cached) or an error. Replies are written to the cache as soon as they arrive, so
a crash loses at most the calls in flight - except a reply that is no usable
answer (refused, unparseable: ``JudgeRequest.usable`` says) to a request sampled
at a non-zero temperature: asking again may well get an answer, so it is not
kept, and one cached by an earlier version is read as a miss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

from explore_persona_space.judge.cache import JudgeCache, cache_key
from explore_persona_space.judge.prompts import PromptTemplate
from explore_persona_space.judge.replies import CallResult, JudgeRequest, Reply
from explore_persona_space.judge.settings import JudgeSettings

if TYPE_CHECKING:
    from explore_persona_space.judge.client import JudgeClient

log = logging.getLogger(__name__)


def make_request(
    template: PromptTemplate,
    values: Mapping[str, str],
    settings: JudgeSettings,
    usable: Callable[[Reply], bool] | None = None,
) -> JudgeRequest:
    """Render the prompt and key it by model, template version, exact inputs and sampling.

    ``usable`` tells an answer from a refusal or garbage (see the module docstring).
    """
    key = cache_key(
        model=settings.model,
        prompt_version=template.version,
        inputs={"template": template.name, **values},
        sampling=settings.sampling(),
    )
    return JudgeRequest(key=key, prompt=template.render(**values), usable=usable)


def worth_keeping(req: JudgeRequest, reply: Reply, deterministic: bool) -> bool:
    """Cache this reply? Usable answers always; unusable ones only when asking again would repeat them."""
    return deterministic or req.usable is None or req.usable(reply)


def _cached(req: JudgeRequest, cache: JudgeCache, judge: JudgeClient) -> CallResult | None:
    rec = cache.get(req.key)
    if rec is None:
        return None
    try:
        reply = Reply.from_record(rec)
    except (KeyError, TypeError, ValueError):
        log.warning("judge cache: entry %s has an unexpected shape; asking again", req.key)
        return None
    if not worth_keeping(req, reply, judge.settings.deterministic):
        judge.accounting.add(rejected_not_cached=1)
        return None
    judge.accounting.add(cache_hits=1)
    return CallResult(reply=reply, cached=True)


def run_requests(
    requests: Sequence[JudgeRequest],
    judge: JudgeClient,
    cache_dir: Path | None,
    *,
    batch: bool = False,
    poll_interval_s: float = 30.0,
    max_wait_s: float | None = None,
) -> dict[str, CallResult]:
    """Answer every request; ``cache_dir`` (None: no cache) also holds the batch state files."""
    cache = JudgeCache(cache_dir) if cache_dir is not None else None
    unique: dict[str, JudgeRequest] = {}
    for req in requests:
        unique.setdefault(req.key, req)
    results: dict[str, CallResult] = {}
    pending: list[JudgeRequest] = []
    for key, req in unique.items():
        hit = _cached(req, cache, judge) if cache is not None else None
        if hit is None:
            pending.append(req)
        else:
            results[key] = hit
    log.info("judge: %d prompts, %d cached, %d to ask", len(unique), len(results), len(pending))
    if not pending:
        return results
    deterministic = judge.settings.deterministic

    def store(req: JudgeRequest, reply: Reply) -> None:
        if cache is None:
            return
        if worth_keeping(req, reply, deterministic):
            cache.put(req.key, reply.to_record())
        else:
            judge.accounting.add(rejected_not_cached=1)

    if batch:
        from explore_persona_space.judge.batch import run_batch

        if cache_dir is None:
            raise ValueError("the batch path needs a cache_dir to persist the submitted batch id")
        results.update(
            run_batch(
                pending,
                judge,
                store,
                state_dir=Path(cache_dir) / "batches",
                poll_interval_s=poll_interval_s,
                max_wait_s=max_wait_s,
            )
        )
    else:
        results.update(_run_concurrent(pending, judge, store))
    return results


def _run_concurrent(
    pending: Sequence[JudgeRequest], judge: JudgeClient, store: Callable[[JudgeRequest, Reply], None]
) -> dict[str, CallResult]:
    def one(req: JudgeRequest) -> CallResult:
        res = judge.call(req.prompt)
        if res.reply is not None:
            store(req, res.reply)
        return res

    out: dict[str, CallResult] = {}
    workers = max(1, min(judge.settings.concurrency, len(pending)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
        futures = {pool.submit(one, req): req.key for req in pending}
        try:
            for fut in as_completed(futures):
                out[futures[fut]] = fut.result()
        except BaseException:
            # A fatal error (retired model, bad key) stops the run; replies already
            # received are in the cache.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return out
