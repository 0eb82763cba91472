"""Run many judge prompts: cache first, then bounded concurrent calls or one batch.

Each prompt gets one ``CallResult`` keyed by its cache key: a reply (fresh or
cached) or an error. Successful replies are written to the cache as soon as they
arrive, so a crash loses at most the calls in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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
    template: PromptTemplate, values: Mapping[str, str], settings: JudgeSettings
) -> JudgeRequest:
    """Render the prompt and key it by model, template version, exact inputs and sampling."""
    key = cache_key(
        model=settings.model,
        prompt_version=template.version,
        inputs={"template": template.name, **values},
        sampling=settings.sampling(),
    )
    return JudgeRequest(key=key, prompt=template.render(**values))


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
        rec = cache.get(key) if cache is not None else None
        if rec is None:
            pending.append(req)
            continue
        try:
            results[key] = CallResult(reply=Reply.from_record(rec), cached=True)
            judge.accounting.add(cache_hits=1)
        except (KeyError, TypeError, ValueError):
            log.warning("judge cache: entry %s has an unexpected shape; asking again", key)
            pending.append(req)
    log.info("judge: %d prompts, %d cached, %d to ask", len(unique), len(results), len(pending))
    if not pending:
        return results
    if batch:
        from explore_persona_space.judge.batch import run_batch

        if cache_dir is None:
            raise ValueError("the batch path needs a cache_dir to persist the submitted batch id")
        results.update(
            run_batch(
                pending,
                judge,
                cache,
                state_dir=Path(cache_dir) / "batches",
                poll_interval_s=poll_interval_s,
                max_wait_s=max_wait_s,
            )
        )
    else:
        results.update(_run_concurrent(pending, judge, cache))
    return results


def _run_concurrent(
    pending: Sequence[JudgeRequest], judge: JudgeClient, cache: JudgeCache | None
) -> dict[str, CallResult]:
    def one(req: JudgeRequest) -> CallResult:
        res = judge.call(req.prompt)
        if res.reply is not None and cache is not None:
            cache.put(req.key, res.reply.to_record())
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
