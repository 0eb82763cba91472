"""A judge request and its reply, one call's outcome, and the calls-and-tokens ledger of a run.

The types both judge paths (concurrent calls in :mod:`runner`, batches in
:mod:`batch`) pass around, so neither of the two imports the other for them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class JudgeRequest:
    key: str  # the cache key; also the batch entry's custom_id
    prompt: str
    # Whether a reply is a usable answer (parses); a reply that is not is cached only when
    # the request is deterministic. None: every reply is usable.
    usable: Callable[[Reply], bool] | None = field(default=None, compare=False, repr=False)


@dataclass
class Reply:
    text: str
    stop_reason: str | None
    model: str  # the id the API says served the request
    input_tokens: int
    output_tokens: int

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Reply:
        return cls(
            text=str(rec["text"]),
            stop_reason=rec.get("stop_reason"),
            model=str(rec["model"]),
            input_tokens=int(rec.get("input_tokens") or 0),
            output_tokens=int(rec.get("output_tokens") or 0),
        )

    @classmethod
    def from_message(cls, msg: Any) -> Reply:
        text = "".join(b.text for b in msg.content if getattr(b, "type", None) == "text")
        usage = msg.usage
        return cls(
            text=text,
            stop_reason=msg.stop_reason,
            model=msg.model,
            input_tokens=int(usage.input_tokens or 0),
            output_tokens=int(usage.output_tokens or 0),
        )


@dataclass
class CallResult:
    reply: Reply | None
    error: str | None = None
    cached: bool = False


@dataclass
class Accounting:
    """Calls and tokens of one judge run; goes into run_result.json as is."""

    requests: int = 0  # HTTP requests to the Messages endpoint, retries included
    retries: int = 0
    succeeded: int = 0
    failed: int = 0  # calls given up on: retries exhausted or a non-retryable error
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    # unusable replies at a sampling temperature, not stored (fresh) or not reused (cached before)
    rejected_not_cached: int = 0
    batch_http_requests: int = 0  # models / create / list / retrieve / results calls of the batch path
    batch_create_attempts: int = 0
    batch_lookups: int = 0  # listings to find a batch whose create had an unclear outcome
    batch_ids: list[str] = field(default_factory=list)
    # batches that may be duplicates of ours (created in our window, same size, never verified)
    batch_possible_duplicates: list[str] = field(default_factory=list)
    credentials: str | None = None  # how the SDK authenticated (a kind, never the value)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def add_reply(self, reply: Reply) -> None:
        self.add(succeeded=1, input_tokens=reply.input_tokens, output_tokens=reply.output_tokens)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
            out["batch_ids"] = list(self.batch_ids)
            out["batch_possible_duplicates"] = list(self.batch_possible_duplicates)
        return out
