"""The Claude client behind every judge: retries, backoff, fatal-error messages.

Built on the official ``anthropic`` SDK, which finds its own credentials (an API
key, an auth token, a profile, workload identity federation) and reads
``ANTHROPIC_BASE_URL``; nothing here copies a credential anywhere. Whether the
judge can run is the SDK's call: :func:`credential_source` asks a constructed
client what it resolved, the same thing the SDK checks before sending a request.
The SDK's own retries are switched off (``max_retries=0``) and this module
retries instead, so that every HTTP attempt is counted and a test can set the
backoff to zero. A model the API no longer serves stops the run with a message
naming ``--judge-model`` instead of turning into a column of errored rows;
rejected credentials stop it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import anthropic

from explore_persona_space.judge.replies import Accounting, CallResult, Reply
from explore_persona_space.judge.settings import (
    CREDENTIAL_SOURCES,
    DEFAULT_JUDGE_MODEL,
    MODEL_FLAG,
    WRITEUP_JUDGE_MODEL,
    JudgeSettings,
    deprecation_notice,
)

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 429})
# Routes on which an unknown-model answer means the judge model itself is not served.
_MODEL_ROUTES = frozenset({"messages.create", "models.retrieve"})
_SDK_NO_AUTH = "Could not resolve authentication method"


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


def credential_source(client: anthropic.Anthropic) -> str | None:
    """How the SDK will authenticate ``client`` (a kind, never the value); None if it cannot.

    Mirrors the SDK's own request-time check (an ``Authorization`` or
    ``X-Api-Key`` header, or a credentials provider), which it raises as a
    TypeError only when a request is built.
    """
    if client.api_key:
        return "api_key"
    if client.auth_token:
        return "auth_token"
    if client.credentials is not None:
        return type(client.credentials).__name__
    custom = {k.lower() for k, v in client.default_headers.items() if isinstance(v, str) and v}
    return "custom_header" if custom & {"authorization", "x-api-key"} else None


class JudgeCredentialsError(RuntimeError):
    """Credentials were configured (a profile, a config directory) but the SDK could not load them."""


def sdk_credentials(settings: JudgeSettings | None = None) -> str | None:
    """What the SDK's credential chain finds in this environment (see :func:`credential_source`)."""
    try:
        client = make_anthropic_client(settings or JudgeSettings())
    except anthropic.AnthropicError as exc:  # e.g. ANTHROPIC_PROFILE naming a missing profile
        raise JudgeCredentialsError(
            f"the anthropic SDK could not load the configured credentials: {exc}"
        ) from None
    try:
        return credential_source(client)
    finally:
        client.close()


def server_time(headers: Any) -> datetime | None:
    """The API server's clock from a response's ``Date`` header (1 s resolution), if it sent one."""
    try:
        return parsedate_to_datetime(headers["date"])
    except (KeyError, TypeError, ValueError):
        return None


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
        self.accounting = Accounting(credentials=credential_source(self.client))
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
        return JudgeModelUnavailableError(self._unavailable(f"HTTP {exc.status_code}: {exc.message}"))

    def _unavailable(self, why: str) -> str:
        return (
            f"judge model {self.settings.model!r} is not served by the API ({why}). It may have been "
            f"retired ({WRITEUP_JUDGE_MODEL}, used by the write-ups, reaches end of life on 2026-11-30). "
            f"Choose another model with {MODEL_FLAG}, e.g. {MODEL_FLAG} {DEFAULT_JUDGE_MODEL}."
        )

    def auth_error(self, what: str, exc: anthropic.APIStatusError) -> JudgeAuthError:
        return JudgeAuthError(
            f"{what}: the API rejected the credentials (HTTP {exc.status_code}); the SDK authenticated with "
            f"{self.accounting.credentials} - check {CREDENTIAL_SOURCES}"
        )

    def check_model(self) -> datetime | None:
        """Ask the Models API (free) whether the judge model is served; returns the server's clock.

        An unknown id answers 404; a retired model may still be listed, with
        ``lifecycle == "retired"``. Either stops the run before anything is paid for.
        """
        raw = self.with_retries(
            lambda: self.client.models.with_raw_response.retrieve(self.settings.model),
            what="models.retrieve",
            on_attempt=lambda: self.accounting.add(batch_http_requests=1),
        )
        info = raw.parse()
        lifecycle = getattr(info, "lifecycle", None)
        if lifecycle == "retired":
            raise JudgeModelUnavailableError(self._unavailable(f"the Models API lists it as {lifecycle}"))
        if lifecycle == "deprecated":
            log.warning("judge model %s is deprecated; %s selects another", self.settings.model, MODEL_FLAG)
        return server_time(raw.headers)

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
                raise self.auth_error(what, exc) from None
            except anthropic.CredentialsError as exc:  # a profile or federation token could not be had
                raise JudgeAuthError(f"{what}: the anthropic SDK could not obtain a token: {exc}") from None
            except TypeError as exc:
                if _SDK_NO_AUTH not in str(exc):
                    raise
                raise JudgeAuthError(
                    f"{what}: the anthropic SDK found no credentials ({CREDENTIAL_SOURCES})"
                ) from None
            except anthropic.APIStatusError as exc:
                if _is_model_problem(exc) and what in _MODEL_ROUTES:
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
