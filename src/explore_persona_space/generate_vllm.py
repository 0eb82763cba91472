"""The vLLM backend of :func:`explore_persona_space.generate.generate` (GPU pods).

Written against vllm 0.32.0 (the version in uv.lock). Choices:

* Prompts go in as ``TokensPrompt`` with the ids the transformers backend uses
  (chat template rendered by our tokenizer, no special tokens added), so vLLM's
  own tokenization (which may add a BOS) never makes the two backends differ.
* One request per (persona, question, sample), ``n=1``, seeded with
  ``derive_seed(seed, persona, question, sample[, "retry", k])``: a sample does
  not depend on batch composition or on ``n_samples``.
* ``stop_token_ids`` are the same set the transformers backend stops on;
  ``token_ids`` then end with the stop token, so ``completion_tokens`` counts it
  as the transformers backend does.
* An adapter is served as a ``LoRARequest`` with ``max_lora_rank`` set from its
  ``adapter_config.json`` (rounded up to a rank vLLM accepts). An adapter vLLM
  cannot serve (rank above the largest allowed, DoRA, bias, modules_to_save,
  ...) or one that fails to load is merged into the base with
  :func:`train.merge_adapter` in a temporary directory, and the merged model
  is served instead; both events are logged.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from explore_persona_space.models import load_tokenizer, resolve_model
from explore_persona_space.sampling import (
    Completion,
    Prompt,
    SampleFn,
    SamplingConfig,
    encode_prompts,
    stop_token_ids,
)
from explore_persona_space.seeds import derive_seed

log = logging.getLogger(__name__)

#: ``vllm.config.lora.MaxLoRARanks`` in vllm 0.32.0.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_ID = 1
DEFAULT_ENGINE_KWARGS: dict[str, Any] = {"gpu_memory_utilization": 0.85}


class VLLMRequestError(Exception):
    """A request vLLM aborted or failed (not an adapter problem, so no merge fallback)."""


def adapter_rank(adapter: Path) -> int:
    """The largest rank in an adapter's config (``r`` and any ``rank_pattern`` override)."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    return max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest rank vLLM accepts that holds ``rank``; None when none does."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), None)


def lora_blockers(adapter: Path) -> list[str]:
    """Why vLLM could not serve this adapter as a LoRA (empty: it can)."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    reasons = []
    if vllm_max_lora_rank(adapter_rank(adapter)) is None:
        reasons.append(f"rank {adapter_rank(adapter)} > {VLLM_LORA_RANKS[-1]}")
    if cfg.get("use_dora"):
        reasons.append("DoRA")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        reasons.append("bias")
    if [m for m in cfg.get("modules_to_save") or [] if m not in ("classifier", "score")]:
        reasons.append(f"modules_to_save={cfg['modules_to_save']}")
    if isinstance(cfg.get("init_lora_weights"), str) and cfg["init_lora_weights"].lower() in (
        "pissa",
        "olora",
        "corda",
        "loftq",
    ):
        reasons.append(f"init_lora_weights={cfg['init_lora_weights']}")
    if cfg.get("layer_replication"):
        reasons.append("layer_replication")
    return reasons


def vllm_sampler(
    model: str,
    prompts: Sequence[Prompt],
    cfg: SamplingConfig,
    adapter: Path | None,
    dtype: str | None,
    progress: bool,
    engine_kwargs: dict[str, Any] | None,
) -> tuple[SampleFn, Callable[[], None]]:
    """Start an engine for ``model`` (+ adapter) and return (sample rows, shut down)."""
    tokenizer = load_tokenizer(model)
    encoded = encode_prompts(tokenizer, prompts)
    stops = stop_token_ids(tokenizer, _generation_config(resolve_model(model)))
    kwargs = {**DEFAULT_ENGINE_KWARGS, **(engine_kwargs or {})}
    temps: list[Path] = []  # merged models, removed in close()
    served = resolve_model(model)
    if adapter is not None and (why := lora_blockers(adapter)):
        log.warning("vLLM cannot serve adapter %s as a LoRA (%s); merging it", adapter, ", ".join(why))
        served, adapter = _merge(model, adapter, temps), None
    state: dict[str, Any] = {}
    try:
        state["llm"], state["lora"] = _engine(served, adapter, cfg, dtype, kwargs)
    except BaseException:
        _remove(temps)
        raise

    def run(rows: Sequence[tuple[int, int]], attempt: int) -> list[Completion]:
        return _vllm_sample(
            state["llm"], state["lora"], prompts, encoded, rows, attempt, cfg, stops, progress
        )

    def sample(rows: Sequence[tuple[int, int]], attempt: int) -> list[Completion]:
        try:
            return run(rows, attempt)
        except (ValueError, RuntimeError) as exc:
            if state["lora"] is None or adapter is None:
                raise
            log.warning("vLLM failed to apply adapter %s (%s); merging it and retrying", adapter, exc)
            _shutdown(state.pop("llm"))
            state["llm"], state["lora"] = _engine(_merge(model, adapter, temps), None, cfg, dtype, kwargs)
            return run(rows, attempt)

    def close() -> None:
        _shutdown(state.pop("llm", None))
        _remove(temps)

    return sample, close


def _remove(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def _generation_config(path: str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's EOS and end-of-turn are enough
        return None


def _merge(model: str, adapter: Path, temps: list[Path]) -> str:
    """Merge on CPU (the GPU may still hold an engine) into a temp dir the caller removes."""
    from explore_persona_space.train import merge_adapter

    tmp = Path(tempfile.mkdtemp(prefix="eps-merged-"))
    temps.append(tmp)
    log.info("merging %s into %s at %s for vLLM", adapter, model, tmp)
    return str(merge_adapter(model, adapter, tmp / "model", device="cpu", dtype="bfloat16"))


def _engine(
    path: str, adapter: Path | None, cfg: SamplingConfig, dtype: str | None, kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    lora_args: dict[str, Any] = {}
    if adapter is not None:
        rank = vllm_max_lora_rank(adapter_rank(adapter))
        lora_args = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
    log.info("starting vLLM on %s%s", path, f" with LoRA {adapter}" if adapter else "")
    llm = LLM(
        model=path,
        dtype=dtype or "auto",
        seed=derive_seed(cfg.seed, "vllm-engine") % (2**31),
        **lora_args,
        **kwargs,
    )
    lora = LoRARequest("adapter", LORA_ID, str(Path(adapter).resolve())) if adapter is not None else None
    return llm, lora


def _vllm_sample(
    llm: Any,
    lora: Any,
    prompts: Sequence[Prompt],
    encoded: Sequence[Sequence[int]],
    rows: Sequence[tuple[int, int]],
    attempt: int,
    cfg: SamplingConfig,
    stops: Sequence[int],
    progress: bool,
) -> list[Completion]:
    from vllm import SamplingParams, TokensPrompt

    requests, params = [], []
    for i, s in rows:
        p = prompts[i]
        extra = ("retry", attempt) if attempt else ()
        requests.append(TokensPrompt(prompt_token_ids=list(encoded[i])))
        params.append(
            SamplingParams(
                n=1,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=0,
                max_tokens=cfg.max_new_tokens,
                seed=derive_seed(cfg.seed, p.persona, p.question, s, *extra),
                stop_token_ids=list(stops),
                skip_special_tokens=True,
            )
        )
    outputs = llm.generate(requests, params, use_tqdm=progress, lora_request=lora)
    return [_completion(out, len(encoded[i])) for out, (i, _) in zip(outputs, rows, strict=True)]


def _completion(out: Any, n_prompt: int) -> Completion:
    (o,) = out.outputs
    if o.finish_reason not in ("stop", "length"):
        raise VLLMRequestError(f"vLLM request {out.request_id} finished with {o.finish_reason!r}")
    return Completion(
        text=o.text,
        prompt_tokens=len(out.prompt_token_ids) if out.prompt_token_ids is not None else n_prompt,
        completion_tokens=len(o.token_ids),
        finish_reason=o.finish_reason,
    )


def _shutdown(llm: Any) -> None:
    """Free the engine's GPU memory so a later call (or a merged-model engine) can start."""
    if llm is None:
        return
    engine = getattr(llm, "llm_engine", None)
    if engine is not None and hasattr(engine, "engine_core"):
        try:
            engine.engine_core.shutdown()
        except Exception as exc:  # best effort: the process may still release it at exit
            log.debug("vLLM shutdown: %s", exc)
    del llm
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
