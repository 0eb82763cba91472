"""Judge model choice and sampling settings; no SDK import, so configuring is free.

The write-ups judged with ``claude-sonnet-4-5``, which the SDK marks deprecated
(end of life 2026-11-30). The default is the current Sonnet,
``claude-sonnet-5-5``; ``claude-sonnet-4-5`` stays selectable with
``--judge-model claude-sonnet-4-5`` for exact reproduction while it is served.
Current models (Sonnet 5 and later, Opus 4.7 and later) answer any non-default
sampling parameter with a 400, so ``temperature=0`` is sent only to the models
that accept it; what is sent is part of the cache key and of every result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_JUDGE_MODEL = "claude-sonnet-5-5"
#: The judge the #247 and #84/#121 write-ups used; deprecated, end of life 2026-11-30.
WRITEUP_JUDGE_MODEL = "claude-sonnet-4-5"
MODEL_FLAG = "--judge-model"
#: Where the ``anthropic`` SDK finds credentials (its own chain decides; this only names it in messages).
CREDENTIAL_SOURCES = (
    "ANTHROPIC_API_KEY, ANTHROPIC_AUTH_TOKEN, a profile (ANTHROPIC_PROFILE or ~/.config/anthropic) "
    "or workload identity federation"
)

# Model-id prefixes that still accept `temperature`. Later models return a 400 for
# any non-default sampling parameter, so nothing is sent to them.
_TEMPERATURE_PREFIXES = (
    "claude-3",
    "claude-sonnet-4-0",
    "claude-sonnet-4-2",
    "claude-opus-4-0",
    "claude-opus-4-1",
    "claude-opus-4-2",
    "claude-sonnet-4-5",
    "claude-sonnet-4-6",
    "claude-haiku-4-5",
    "claude-opus-4-5",
    "claude-opus-4-6",
)


def accepts_temperature(model: str) -> bool:
    return model.startswith(_TEMPERATURE_PREFIXES)


def deprecation_notice(model: str) -> str | None:
    """End-of-life date from the installed SDK's deprecation table, if the model is in it."""
    try:
        from anthropic.resources.messages.messages import DEPRECATED_MODELS
    except ImportError:  # the table is SDK-internal; its absence is not an error
        return None
    date = DEPRECATED_MODELS.get(model)
    return f"deprecated by the API, end of life {date}" if date else None


@dataclass(frozen=True)
class JudgeSettings:
    model: str = DEFAULT_JUDGE_MODEL
    # Generous: current models think adaptively before the one-line answer, and a
    # reply cut off by max_tokens has no verdict in it. Unused tokens cost nothing.
    max_tokens: int = 1024
    temperature: float | None = 0.0  # sent only where accepts_temperature(model)
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_base_s: float = 2.0
    backoff_max_s: float = 60.0
    concurrency: int = 8

    def sampling(self) -> dict[str, Any]:
        """What is sent besides the prompt; part of the cache key and of every result."""
        sent = self.temperature if accepts_temperature(self.model) else None
        return {"max_tokens": self.max_tokens, "temperature": sent}

    @property
    def deterministic(self) -> bool:
        """Temperature 0 is sent: asking again buys the same answer. The models' fixed default samples."""
        return self.sampling()["temperature"] == 0

    def describe(self) -> dict[str, Any]:
        out = {**asdict(self), "sampling_sent": self.sampling()}
        if self.sampling()["temperature"] is None:
            out["sampling_note"] = "no temperature sent: the model's fixed default sampling applies"
        notice = deprecation_notice(self.model)
        if notice:
            out["model_deprecation"] = notice
        return out
