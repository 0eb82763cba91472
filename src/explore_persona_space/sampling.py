"""What both generation backends share: settings, prompt and completion types, token inputs.

Its own module so that :mod:`generate` (the entry point, which starts the vLLM
backend lazily) and :mod:`generate_vllm` both depend on it instead of on each
other. ``encode_prompts`` and ``stop_token_ids`` live here because the two
backends must feed identical token ids and stop on the same token set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from explore_persona_space.models import end_of_turn, render_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BACKENDS = ("auto", "transformers", "vllm")
#: One range for both backends: vLLM's ``SamplingParams`` refuses temperatures above 2.
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings; defaults are PROTOCOL.md's eval recipe at full scale."""

    n_samples: int = 10
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 42
    batch_size: int = 128  # transformers backend, plain decode: rows (prompt x sample) decoded together
    # transformers backend, fast decode (see generate.hf_sample): None = on CUDA only.
    fast_decode: bool | None = None
    fast_batch_size: int = 512  # rows per generate() call when decoding fast
    # transformers backend, plain decode: read each prompt once and copy its KV cache to its samples
    # (see generate.hf_sample); same distribution, other draws than per-row prompts. None = on.
    shared_prefill: bool | None = None

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.fast_batch_size < 1:
            raise ValueError(f"n_samples, max_new_tokens and batch_size must be >= 1: {self}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE or not 0 < self.top_p <= 1:
            raise ValueError(f"need 0 <= temperature <= {MAX_TEMPERATURE} and 0 < top_p <= 1: {self}")


@dataclass(frozen=True)
class Prompt:
    persona: str  # the label written into records
    question: str
    system: str | None  # None: no system message (the chat template's default applies)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # up to and including the stop token
    finish_reason: str  # "stop" | "length"


#: A backend samples the given rows (prompt index, sample index) and returns one Completion per row.
#: ``attempt`` is 0 for the first draw and k for the k-th re-draw of empty completions.
SampleFn = Callable[[Sequence[tuple[int, int]], int], list[Completion]]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> list[int]:
    """End-of-turn plus every EOS id the tokenizer and the generation config name, sorted."""
    ids = {tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    return sorted(i for i in ids if i is not None and i >= 0)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each rendered prompt; no special tokens added (the chat template holds them)."""
    texts = [render_prompt(tokenizer, p.system, p.question) for p in prompts]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
