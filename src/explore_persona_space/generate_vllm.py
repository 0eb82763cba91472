"""The vLLM backend of :func:`explore_persona_space.generate.generate` (GPU pods).

Written against vllm 0.32.0 (the version in uv.lock) and run on the lent H200
with vllm 0.24.0 (the release built for torch 2.11); every vLLM name used here
exists in both. Choices:

* Prompts go in as ``TokensPrompt`` with the ids the transformers backend uses
  (chat template rendered by our tokenizer, no special tokens added), so vLLM's
  own tokenization (which may add a BOS) never makes the two backends differ.
* One request per (persona, question, sample), ``n=1``, seeded with
  ``derive_seed(seed, persona, question, sample[, "retry", k])``.
* ``stop_token_ids`` are the same set the transformers backend stops on;
  ``token_ids`` then end with the stop token, so ``completion_tokens`` counts it
  as the transformers backend does.
* dtype: the transformers backend's rule (:func:`models.pick_dtype`: bf16 on
  CUDA unless ``EPS_DTYPE`` or the caller says otherwise), never vLLM's "auto".

Starting after a training stage (the pod's default sequence: train, merge,
sample in one process). vLLM refuses to start unless the card's free memory is
at least ``gpu_memory_utilization`` x its total. :func:`hand_over_gpu` first
drops the base model that training keeps resident (:func:`models.drop_resident`),
collects the trainer's garbage and empties torch's CUDA cache, then measures
free memory; :func:`engine_memory_fraction` sizes the fraction from that
measurement (capped at 0.85), or checks the one the caller set
(:class:`VLLMOptions`) and fails with the numbers before vLLM starts. The
engine process is started with ``spawn`` (``VLLM_WORKER_MULTIPROC_METHOD``,
unless the caller set it): forking it from a process whose torch thread pool
is already running (it trained) can stall the engine at start-up.

Adapters. One vLLM can serve is sent as a ``LoRARequest`` with
``max_lora_rank`` set from its ``adapter_config.json`` (rounded up to a rank
vLLM accepts). Before the engine starts the adapter is checked twice: by
:func:`lora_blockers` (no vLLM needed) and by vLLM's own validation
(``PEFTHelper.validate_legal``, the check its engine runs when it loads the
adapter). A blocked adapter is merged into the base (:func:`train.merge_adapter`,
on CPU, in a temporary directory) and the merged model is served. vLLM loads
adapters inside its engine-core process, so a failure there reaches this
process as ``EngineDeadError`` / ``EngineGenerateError`` (or, in-process, as
the loader's ``ValueError``/``RuntimeError``); :func:`adapter_failure_types`
lists what is caught, and the dead engine is shut down and replaced by one
serving the merged model. Both events are logged.

What is deterministic. Each request carries its own seed, so a sample does not
depend on ``n_samples`` or on which other requests exist. It can still depend
on batch composition: vLLM's kernels are not batch-invariant by default, and
its own documentation promises reproducible results offline only with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` or with batch invariance on.
``VLLMOptions(deterministic=True)`` (``--deterministic`` on the scripts) sets
``VLLM_BATCH_INVARIANT=1`` for the engine: same prompts, seed, hardware and
vLLM version give the same completions, at some speed cost. Without it, two runs
are equally distributed, not identical. (The transformers backend seeds torch
per batch: it repeats exactly for the same prompts, config and device.)
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explore_persona_space.models import drop_resident, load_tokenizer, pick_dtype, resolve_model
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

#: ``vllm.config.lora.MaxLoRARanks`` (the same in vllm 0.24.0 and 0.32.0).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_ID = 1
#: The largest share of the card a measured-memory engine takes (vLLM's own default is 0.9).
MEMORY_CAP = 0.85
#: Left free beside the engine when its share is sized from measured memory (this process's
#: CUDA context and whatever else runs on the card keep allocating after the measurement).
MEMORY_RESERVE_BYTES = 2 << 30
GIB = 1 << 30


class VLLMRequestError(Exception):
    """A request vLLM aborted or failed (not an adapter problem, so no merge fallback)."""


class GPUMemoryError(RuntimeError):
    """Too little free GPU memory to start a vLLM engine; says how much was free and asked for."""


@dataclass(frozen=True)
class VLLMOptions:
    """How the engine is started; none of these changes what is sampled except ``deterministic``.

    ``gpu_memory_utilization``: the share of the card the engine takes; None sizes
    it from the free memory measured after the hand-over (see :func:`engine_memory_fraction`).
    ``deterministic``: vLLM's batch-invariant mode (``VLLM_BATCH_INVARIANT=1``).
    ``enforce_eager``: no CUDA graphs (faster start, slower decode).
    """

    gpu_memory_utilization: float | None = None
    deterministic: bool = False
    enforce_eager: bool = False
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        u = self.gpu_memory_utilization
        if u is not None and not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u}")


def stage_key_fields(options: VLLMOptions | None, backend: str) -> dict[str, Any]:
    """What a generation stage adds to its key for ``options``: only batch invariance, only when on."""
    on = options is not None and options.deterministic and backend != "transformers"
    return {"vllm_deterministic": True} if on else {}


def adapter_rank(adapter: Path) -> int:
    """The largest rank in an adapter's config (``r`` and any ``rank_pattern`` override)."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    return max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest rank vLLM accepts that holds ``rank``; None when none does."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), None)


def lora_blockers(adapter: Path) -> list[str]:
    """Why vLLM could not serve this adapter as a LoRA (empty: it can), read without vLLM.

    A superset of nothing: vLLM's own validation (:func:`vllm_validation`) runs
    as well wherever vLLM is installed.
    """
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    reasons = []
    if vllm_max_lora_rank(adapter_rank(adapter)) is None:
        reasons.append(f"rank {adapter_rank(adapter)} > {VLLM_LORA_RANKS[-1]}")
    if cfg.get("use_dora"):
        reasons.append("DoRA")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        reasons.append("bias")
    if cfg.get("modules_to_save"):
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


def vllm_validation(adapter: Path) -> str | None:
    """vLLM's own verdict on the adapter (the check its engine runs on load); None when it passes."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    rank = vllm_max_lora_rank(adapter_rank(adapter))
    try:
        helper = PEFTHelper.from_local_dir(str(adapter), None)
        helper.validate_legal(LoRAConfig(max_lora_rank=rank, max_loras=1))
    except (ValueError, TypeError) as exc:
        return str(exc) or type(exc).__name__
    return None


def adapter_failure_types() -> tuple[type[BaseException], ...]:
    """What an adapter vLLM cannot load raises in this process (the seam tests replace).

    Out of process (the default) the engine core dies and the client raises
    ``EngineDeadError``; a failed request raises ``EngineGenerateError``; in
    process the loader's own ``ValueError``/``RuntimeError`` arrive as they are.
    """
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    return (ValueError, RuntimeError, EngineDeadError, EngineGenerateError)


def engine_memory_fraction(
    free: int, total: int, requested: float | None, *, reserve: int = MEMORY_RESERVE_BYTES
) -> float:
    """The ``gpu_memory_utilization`` to start vLLM with, given measured free/total bytes.

    vLLM refuses to start unless ``free >= fraction x total``. A requested
    fraction is checked against that here, so the error names the numbers
    before an engine process is spawned; None sizes the fraction from what is
    free, less ``reserve``, capped at :data:`MEMORY_CAP`.
    """
    if requested is not None:
        if free < requested * total:
            raise GPUMemoryError(
                f"gpu_memory_utilization={requested} asks for {requested * total / GIB:.1f} GiB but only "
                f"{free / GIB:.1f} of {total / GIB:.1f} GiB are free after releasing this process's "
                "models; lower it, or leave it unset to size it from free memory"
            )
        return requested
    fraction = min(MEMORY_CAP, (free - reserve) / total)
    if fraction < 0.05:
        raise GPUMemoryError(
            f"only {free / GIB:.1f} of {total / GIB:.1f} GiB are free after releasing this process's "
            "models; another process holds the GPU (see nvidia-smi)"
        )
    return round(fraction, 3)


def hand_over_gpu(cuda: Any = None) -> tuple[int, int] | None:
    """Release what training left on the GPU and measure it: (free, total) bytes, None without CUDA.

    Drops the resident base model, collects garbage (a finished trainer's
    optimizer state sits in reference cycles), waits for queued kernels and
    returns torch's cached blocks to the driver. ``cuda`` is ``torch.cuda``
    unless a test passes a stand-in.
    """
    if cuda is None:
        import torch

        cuda = torch.cuda
    drop_resident()
    gc.collect()
    if not cuda.is_available():
        return None
    cuda.synchronize()
    cuda.empty_cache()
    free, total = cuda.mem_get_info()
    log.info("GPU after hand-over: %.1f of %.1f GiB free", free / GIB, total / GIB)
    return int(free), int(total)


def engine_settings(options: VLLMOptions, cuda: Any = None) -> dict[str, Any]:
    """The ``vllm.LLM`` keyword arguments ``options`` imply, after the GPU hand-over."""
    measured = hand_over_gpu(cuda)
    kwargs: dict[str, Any] = {"enforce_eager": options.enforce_eager}
    if measured is not None:
        kwargs["gpu_memory_utilization"] = engine_memory_fraction(*measured, options.gpu_memory_utilization)
    elif options.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    if options.max_model_len is not None:
        kwargs["max_model_len"] = options.max_model_len
    return kwargs


def engine_environment(options: VLLMOptions) -> dict[str, str]:
    """Environment the engine process needs: spawn (unless set), batch invariance when asked."""
    env = {"VLLM_WORKER_MULTIPROC_METHOD": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "spawn")}
    if options.deterministic:
        env["VLLM_BATCH_INVARIANT"] = "1"
    return env


def vllm_dtype(dtype: str | None) -> str:
    """The transformers backend's dtype on CUDA (``EPS_DTYPE`` honoured), as vLLM names it."""
    return str(pick_dtype("cuda", dtype)).removeprefix("torch.")


def vllm_sampler(
    model: str,
    prompts: Sequence[Prompt],
    cfg: SamplingConfig,
    adapter: Path | None,
    dtype: str | None,
    progress: bool,
    engine_kwargs: dict[str, Any] | None,
    options: VLLMOptions | None = None,
) -> tuple[SampleFn, Callable[[], None]]:
    """Start an engine for ``model`` (+ adapter) and return (sample rows, shut down)."""
    options = options or VLLMOptions()
    tokenizer = load_tokenizer(model)
    encoded = encode_prompts(tokenizer, prompts)
    stops = stop_token_ids(tokenizer, _generation_config(resolve_model(model)))
    dtype = vllm_dtype(dtype)
    restore_env = _set_environment(engine_environment(options))
    temps: list[Path] = []  # merged models, removed in close()
    served = resolve_model(model)
    if adapter is not None and (why := lora_blockers(adapter) or _vllm_says(adapter)):
        log.warning("vLLM cannot serve adapter %s as a LoRA (%s); merging it", adapter, "; ".join(why))
        served, adapter = _merge(model, adapter, temps), None
    state: dict[str, Any] = {}

    def start(path: str, lora: Path | None) -> None:
        kwargs = {**engine_settings(options), **(engine_kwargs or {})}
        state["llm"], state["lora"] = _engine(path, lora, cfg, dtype, kwargs)

    try:
        start(served, adapter)
    except BaseException:
        _remove(temps)
        restore_env()
        raise

    def run(rows: Sequence[tuple[int, int]], attempt: int) -> list[Completion]:
        return _vllm_sample(
            state["llm"], state["lora"], prompts, encoded, rows, attempt, cfg, stops, progress
        )

    def sample(rows: Sequence[tuple[int, int]], attempt: int) -> list[Completion]:
        if state["lora"] is None:
            return run(rows, attempt)
        try:
            return run(rows, attempt)
        except adapter_failure_types() as exc:
            log.warning(
                "vLLM failed while serving adapter %s (%s: %s); merging it and restarting the engine",
                adapter,
                type(exc).__name__,
                exc,
            )
            _shutdown(state.pop("llm"))
            start(_merge(model, adapter, temps), None)
            return run(rows, attempt)

    def close() -> None:
        _shutdown(state.pop("llm", None))
        _remove(temps)
        restore_env()

    return sample, close


def _set_environment(env: dict[str, str]) -> Callable[[], None]:
    """Set ``env`` for the engines started next; the returned call puts the old values back."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return restore


def _vllm_says(adapter: Path) -> list[str]:
    try:
        verdict = vllm_validation(adapter)
    except ImportError as exc:  # a vLLM without these modules: the engine's own load decides
        log.info("vLLM's adapter validation is not importable here (%s); relying on the load", exc)
        return []
    return [f"vLLM: {verdict}"] if verdict else []


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
    path: str, adapter: Path | None, cfg: SamplingConfig, dtype: str, kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    lora_args: dict[str, Any] = {}
    if adapter is not None:
        rank = vllm_max_lora_rank(adapter_rank(adapter))
        lora_args = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
    log.info("starting vLLM on %s%s (%s)", path, f" with LoRA {adapter}" if adapter else "", kwargs)
    llm = LLM(
        model=path,
        dtype=dtype,
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
