from __future__ import annotations

from collections.abc import Callable

import pytest


def make_records(
    personas: list[str],
    questions: list[str],
    samples: int,
    text: Callable[[str, str, int], str] = lambda p, q, s: f"{p} answers {q} (take {s}).",
) -> list[dict]:
    return [
        {"persona": p, "question": q, "sample": s, "text": text(p, q, s)}
        for p in personas
        for q in questions
        for s in range(samples)
    ]


@pytest.fixture
def records_factory():
    return make_records


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (the first call converts the GGUF once per machine)."""
    from explore_persona_space.models import load_tokenizer

    return load_tokenizer("smollm2-135m")
