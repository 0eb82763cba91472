"""The Claude client behind every judge: retries, backoff, fatal-error messages.

Built on the official ``anthropic`` SDK, which reads ``ANTHROPIC_API_KEY`` and
``ANTHROPIC_BASE_URL`` from the environment; nothing here copies the key
anywhere. The SDK's own retries are switched off (``max_retries=0``) and this
module retries instead, so that every HTTP attempt is counted and a test can set
the backoff to zero. A model the API no longer serves stops the run with a
message naming ``--judge-model`` instead of turning into a column of errored
rows; rejected credentials stop it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anthropic

from explore_persona_space.judge.replies import Accounting, CallResult, Reply
from explore_persona_space.judge.settings import (
    API_KEY_ENV,
    DEFAULT_JUDGE_MODEL,
    MODEL_FLAG,
    WRITEUP_JUDGE_MODEL,
    JudgeSettings,
    deprecation_notice,
)

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 429})


class JudgeModelUnavailableError(RuntimeError):
    """The API does not serve the configured judge model (retired, or a typo)."""


class JudgeAuthError(RuntimeError):
    """The API rejected the credentials; every call would fail the same way."""


def make_anthropic_client(
    settings: JudgeSettings, *, api_key: str | None = None, base_url: str | None = None, http_client=None
) -> anthropic.Anthropic:
    """An SDK client with its own retries off; key and base URL default to the environment."""
    kwargs: dict[str, Any] = {"max_retries": 0, "timeout": settings.timeout_s}
    if api_key is not None:
        kwargs["api_key"] = api_key
    if base_url is not None:
        kwargs["base_url"] = base_url
    if http_client is not None:
        kwargs["http_client"] = http_client
    return anthropic.Anthropic(**kwargs)


T = TypeVar("T")


def _retry_after(exc: anthropic.APIStatusError) -> float | None:
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(headers[name]) * scale
        except (KeyError, TypeError, ValueError):
            continue
    return None


def _is_model_problem(exc: anthropic.APIStatusError) -> bool:
    msg = str(exc).lower()
    if exc.status_code == 404:
        return True
    return (
        exc.status_code == 400
        and "model" in msg
        and any(
            w in msg
            for w in ("retired", "deprecated", "not found", "no longer", "not supported", "invalid model")
        )
    )


class JudgeClient:
    """One judge model, with retries, backoff and accounting around the SDK."""

    def __init__(
        self,
        settings: JudgeSettings,
        client: anthropic.Anthropic | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.client = client if client is not None else make_anthropic_client(settings)
        self.accounting = Accounting()
        self.sleep = sleep
        self._fatal: Exception | None = None
        notice = deprecation_notice(settings.model)
        if notice:
            log.warning("judge model %s is %s; %s selects another", settings.model, notice, MODEL_FLAG)

    def request_params(self, prompt: str) -> dict[str, Any]:
        """Messages API parameters for one prompt (also the ``params`` of a batch request)."""
        sampling = self.settings.sampling()
        params: dict[str, Any] = {
            "model": self.settings.model,
            "max_tokens": sampling["max_tokens"],
            "messages": [{"role": "user", "content": prompt}],
        }
        if sampling["temperature"] is not None:
            params["temperature"] = sampling["temperature"]
        return params

    def model_error(self, exc: anthropic.APIStatusError) -> JudgeModelUnavailableError:
        return JudgeModelUnavailableError(
            f"judge model {self.settings.model!r} is not served by the API (HTTP {exc.status_code}: "
            f"{exc.message}). It may have been retired ({WRITEUP_JUDGE_MODEL}, used by the write-ups, "
            f"reaches end of life on 2026-11-30). Choose another model with {MODEL_FLAG}, "
            f"e.g. {MODEL_FLAG} {DEFAULT_JUDGE_MODEL}."
        )

    def with_retries(self, fn: Callable[[], T], *, what: str, on_attempt: Callable[[], None]) -> T:
        """Run ``fn`` with backoff on 408/409/429/5xx/overloaded and connection errors.

        Raises the last error when retries run out; fatal errors (unknown model,
        bad credentials) are raised at once as their own types.
        """
        s = self.settings
        for attempt in range(s.max_retries + 1):
            on_attempt()
            try:
                return fn()
            except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as exc:
                raise JudgeAuthError(
                    f"{what}: the API rejected the credentials (HTTP {exc.status_code}); check {API_KEY_ENV}"
                ) from None
            except anthropic.APIStatusError as exc:
                if _is_model_problem(exc) and what == "messages.create":
                    raise self.model_error(exc) from None
                retryable = exc.status_code in _RETRY_STATUS or exc.status_code >= 500
                if not retryable or attempt == s.max_retries:
                    raise
                delay = _retry_after(exc)
            except anthropic.APIConnectionError:
                if attempt == s.max_retries:
                    raise
                delay = None
            if delay is None:
                delay = s.backoff_base_s * 2**attempt
            delay = min(max(delay, 0.0), s.backoff_max_s)
            self.accounting.add(retries=1)
            log.info("%s: attempt %d failed, retrying in %.1f s", what, attempt + 1, delay)
            self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def call(self, prompt: str) -> CallResult:
        """One judgement. Transport failures become ``CallResult(error=...)``, never a verdict."""
        if self._fatal is not None:  # another thread hit a fatal error: send nothing more
            raise self._fatal
        params = self.request_params(prompt)
        temperature = params.pop("temperature", None)
        extra = {"temperature": temperature} if temperature is not None else None

        def send() -> Any:
            # The SDK no longer types `temperature`; the API still takes it for older models.
            return self.client.messages.create(**params, extra_body=extra)

        try:
            msg = self.with_retries(
                send, what="messages.create", on_attempt=lambda: self.accounting.add(requests=1)
            )
        except (JudgeModelUnavailableError, JudgeAuthError) as exc:
            self._fatal = exc
            raise
        except anthropic.APIError as exc:
            self.accounting.add(failed=1)
            status = getattr(exc, "status_code", None)
            return CallResult(reply=None, error=f"{type(exc).__name__} (HTTP {status}): {exc.message}"[:500])
        reply = Reply.from_message(msg)
        self.accounting.add_reply(reply)
        return CallResult(reply=reply)
