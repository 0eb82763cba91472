"""The stage kinds every orchestrator chains: train, merge, re-apply, generate/evaluate, coupling data,
geometry.

Each factory returns a :class:`~explore_persona_space.pipeline.Stage` whose
config is plain JSON (so it hashes) and whose function writes into its own
directory. The model a stage works on travels down the chain as a reference in
each stage's result (``{"base": ref, "adapter": ref | None}``, a ref being an
alias/hub id/path or ``{"stage": name, "path": relative}``), so a
coupling LoRA trained after a merge finds the merged stage-1 base without any
absolute path being baked into a config hash. A chain may also start from a
published adapter: ``adapter="hub:ORG/REPO/<folder>[@REVISION]"`` (or a local
adapter directory); the first stage pins a hub reference to the commit it read.

:func:`geometry_stage` stores persona vectors (hidden states per persona x
question, Methods A and B) as safetensors for :mod:`explore_persona_space.geometry`.

Training data comes from a data spec resolved by :data:`DATA_LOADERS`
(``chat_jsonl`` for a JSONL of chats, ``upstream`` for a dataset built by an
earlier stage, ``hf_chat`` and ``em_jsonl`` for the stage-1 sources of
:mod:`explore_persona_space.sft_data`); orchestrators register loaders for
their own sources.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from explore_persona_space import hub
from explore_persona_space.analyze import analyze
from explore_persona_space.data import DatasetBuildError, build_contrastive_dataset
from explore_persona_space.errors import InputError, StageOutOfMemoryError
from explore_persona_space.generate_vllm import VLLMOptions, stage_key_fields
from explore_persona_space.metrics import LOOSE_DEFINITION
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.personas import get_marker, questions
from explore_persona_space.pipeline import Stage, StageContext, config_hash, run_chain
from explore_persona_space.results import atomic_write_text, read_raw_completions, write_raw_completions
from explore_persona_space.sft_data import (
    ChatRows,
    em_jsonl_data,
    file_fingerprint,
    hf_chat_data,
    read_jsonl,
)

log = logging.getLogger(__name__)

Ref = str | Mapping[str, str]
T = TypeVar("T")
RAW = "raw_completions.json"
GREEDY = "greedy.json"  # a geometry stage's greedy responses (Method B), raw-completions format
DATASET = "dataset.jsonl"


# ----------------------------------------------------------------------------- model references
def model_state(ctx: StageContext) -> dict[str, Any]:
    """The model this stage works on: the parent's outgoing model, or the chain root's base (+ adapter)."""
    if ctx.parent is not None:
        return dict(ctx.parent.result["model"])
    if "base" not in ctx.stage.config:
        raise ValueError(f"stage {ctx.stage.name!r} starts a chain but its config names no 'base' model")
    adapter = ctx.stage.config.get("adapter")
    if hub.is_ref(adapter):
        adapter = hub.pin(adapter)
    elif adapter is not None:
        check_adapter_dir(adapter)
    return {"base": ctx.stage.config["base"], "adapter": adapter}


def resolve(ctx: StageContext, ref: Ref | None) -> str | None:
    """A model reference as a loadable name or local path (a ``hub:`` adapter is downloaded, once)."""
    if hub.is_ref(ref):
        return str(hub.fetch_adapter(ref))
    if ref is None or isinstance(ref, str):
        return ref
    root = ctx.dir if ref["stage"] == ctx.stage.name else ctx.upstream(ref["stage"]).dir
    return str(root / ref["path"])


ADAPTER_CONFIG = "adapter_config.json"


def check_adapter_dir(adapter: str | Path) -> Path:
    """A local LoRA adapter directory, or an InputError saying what is missing (before any model loads)."""
    path = Path(adapter).expanduser()
    path = path if path.is_absolute() or path.exists() else REPO_ROOT / path
    if not path.is_dir():
        raise InputError(f"adapter {adapter}: no such directory (looked at {path})")
    if not (path / ADAPTER_CONFIG).is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise InputError(f"adapter {path}: no {ADAPTER_CONFIG}; not a PEFT adapter directory (holds {found})")
    return path


def _root_config(base: str | None, adapter: str | None = None) -> dict[str, Any]:
    # "adapter" only when given, so the keys of chains without one stay what they were
    return {"base": base, **({"adapter": adapter} if adapter else {})} if base is not None else {}


# ----------------------------------------------------------------------------- training data
def _chat_jsonl(ctx: StageContext, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    path = Path(spec["path"])
    return read_jsonl(path if path.is_absolute() else REPO_ROOT / path, spec.get("n"))


def _upstream(ctx: StageContext, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return read_jsonl(ctx.upstream(spec["stage"]).dir / DATASET)


# A loader returns the examples, or ChatRows when it has something for the stage record (hub commit,
# shuffle, skipped rows).
DataLoader = Callable[[StageContext, Mapping[str, Any]], list[dict[str, Any]] | ChatRows]
DATA_LOADERS: dict[str, DataLoader] = {
    "chat_jsonl": _chat_jsonl,
    "upstream": _upstream,
    # Stage-1 sources of explore_persona_space.sft_data: benign SFT (Tulu-3, UltraChat) and EM induction.
    "hf_chat": hf_chat_data,
    "em_jsonl": em_jsonl_data,
}


def read_training_data(ctx: StageContext, spec: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict]:
    """The examples a data spec names, and what the stage records about them (empty if nothing)."""
    try:
        loader = DATA_LOADERS[spec["kind"]]
    except KeyError:
        raise ValueError(f"unknown data kind {spec.get('kind')!r}; known: {sorted(DATA_LOADERS)}") from None
    loaded = loader(ctx, spec)
    return (loaded.chats, loaded.record) if isinstance(loaded, ChatRows) else (loaded, {})


def load_training_data(ctx: StageContext, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return read_training_data(ctx, spec)[0]


# ----------------------------------------------------------------------------- out of memory
def out_of_memory_guard(stage: str, doing: str, batch: str, knob: str) -> Callable[[Callable[[], T]], T]:
    """Run a training or sampling call; turn a CUDA out-of-memory error into one clear message.

    The message names the stage, the batch it was running and the knob that lowers it. The
    model is released first (the resident base, the frames holding a freshly loaded one, torch's
    cached blocks), so the process - or a rerun in it - starts from free memory; the exception
    propagates out of the stage function, so the stage stays unfinished and the next run with a
    smaller setting computes it.
    """

    def call(fn: Callable[[], T]) -> T:
        import torch

        try:
            return fn()
        except torch.cuda.OutOfMemoryError as exc:
            detail = (str(exc).strip().splitlines() or ["out of memory"])[0]
            exc.__traceback__ = None  # its frames hold the model: let them go before freeing the cache
            del exc
            release_models()
            msg = f"stage {stage!r} ran out of GPU memory while {doing} ({batch}): lower it with {knob}"
            raise StageOutOfMemoryError(f"{msg}; the stage is left unfinished [{detail}]") from None

    return call


def release_models() -> None:
    """Drop the resident base model and return torch's cached GPU memory (after an OOM)."""
    import gc

    from explore_persona_space.models import drop_resident

    drop_resident()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_knob(cfg: Any, knob: str | None) -> tuple[str, str]:
    batch = f"micro-batch {cfg.micro_batch_size} of batch {cfg.batch_size}"
    if getattr(cfg, "grow_micro_batch", False):
        batch += " (on CUDA grow_micro_batch may have raised it to fit)"
    how = f"--set {knob}=<smaller>" if knob else "a smaller micro_batch_size in the stage's TrainConfig"
    return batch, how


def _sampling_knob(sampling: Any, backend: str, knob: str | None) -> tuple[str, str]:
    if backend == "vllm":
        return "vLLM engine", "--vllm-memory <smaller fraction>, or fewer max_new_tokens"
    batch = f"batch of {sampling.batch_size} rows (fast decode {sampling.fast_batch_size})"
    how = f"--set {knob}=<smaller>" if knob else "a smaller batch_size (SamplingConfig)"
    return batch, how


# ----------------------------------------------------------------------------- stage factories
def train_stage(
    name: str,
    cfg: Any,
    data: Mapping[str, Any],
    *,
    parent: Stage | None = None,
    base: str | None = None,
    key: Mapping[str, Any] | None = None,
    device: str | None = None,
    knob: str | None = None,
) -> Stage:
    """LoRA SFT on the chain's current (merged) model. ``key`` adds labels that only key the hash.

    ``knob`` is the ``--set`` key that lowers this stage's micro-batch, named if it runs out of memory.
    """
    from explore_persona_space.train import train_lora

    def run(ctx: StageContext) -> dict[str, Any]:
        state = model_state(ctx)
        if state["adapter"] is not None:
            raise ValueError(f"stage {name!r}: merge the upstream adapter before training another LoRA")
        examples, data_record = read_training_data(ctx, data)
        guard = out_of_memory_guard(name, "training", *_train_knob(cfg, knob))
        base = resolve(ctx, state["base"])
        result = guard(lambda: train_lora(base, examples, cfg, ctx.dir / "adapter", device=device))
        summary = result.to_dict()
        summary.pop("adapter_dir")
        out = {
            "model": {"base": state["base"], "adapter": {"stage": name, "path": "adapter"}},
            "train": summary,
        }
        source = data.get("path") or data.get("source")
        if isinstance(source, str) and (fingerprint := file_fingerprint(source)):
            out["data_file"] = fingerprint  # which bytes were trained on (a local file's hashes)
        if data_record:
            out["data_source"] = data_record  # hub commit read, shuffle, rows read/kept/skipped
        return out

    config = {**_root_config(base), "train": cfg.to_dict(), "data": dict(data), "key": dict(key or {})}
    n_steps = "max_steps" if cfg.max_steps > 0 else f"{cfg.epochs} epochs"
    estimate = f"LoRA r={cfg.r}, {n_steps}, lr {cfg.learning_rate}"
    return Stage(name, run, config, parent=parent, estimate=estimate, device=device, uses_model=True)


def merge_stage(
    name: str,
    *,
    parent: Stage | None = None,
    base: str | None = None,
    adapter: str | None = None,
    device: str | None = None,
) -> Stage:
    """Fold the upstream adapter into its base: the stage-1 model a second LoRA trains on.

    Without a parent it starts a chain from ``base`` + ``adapter`` (e.g. a published
    coupling adapter, ``hub:ORG/REPO/<folder>``, re-applied before another fine-tune).
    """
    from explore_persona_space.train import merge_adapter

    def run(ctx: StageContext) -> dict[str, Any]:
        state = model_state(ctx)
        if state["adapter"] is None:
            raise ValueError(f"stage {name!r}: nothing to merge, the upstream model has no adapter")
        merge_adapter(
            resolve(ctx, state["base"]),
            Path(resolve(ctx, state["adapter"])),
            ctx.dir / "model",
            device=device,
        )
        return {"model": {"base": {"stage": name, "path": "model"}, "adapter": None}}

    config = _root_config(base, adapter) if parent is None else {}
    estimate = "merge adapter into base"
    return Stage(name, run, config, parent=parent, estimate=estimate, device=device, uses_model=True)


def reapply_adapter_stage(name: str, *, parent: Stage, trained: Stage, device: str | None = None) -> Stage:
    """Put a LoRA trained in another chain (``trained``) on this chain's merged model, unmerged.

    The #121 reverse order: the coupling adapter trained on the bare instruct model,
    applied as it is to a model that went through stage-1 SFT first. The adapter is
    copied into this stage's directory (so references stay inside the chain); the
    ``trained`` stage is reused from the shared store, or computed first if it is
    not there yet. Its key is this stage's config, so a retrained adapter is a new stage.
    """

    def run(ctx: StageContext) -> dict[str, Any]:
        state = model_state(ctx)
        if state["adapter"] is not None:
            raise ValueError(f"stage {name!r}: merge the upstream adapter before re-applying another")
        store = ctx.dir.parent.parent  # <store>/stages/<this stage>: see pipeline.stage_dir
        donor = run_chain(store, trained)[-1]
        ref = donor.result["model"]["adapter"]
        if ref is None or isinstance(ref, str) or ref["stage"] != trained.name:
            raise ValueError(f"stage {name!r}: stage {trained.name!r} did not train an adapter of its own")
        shutil.copytree(donor.dir / ref["path"], ctx.dir / "adapter")
        return {
            "model": {"base": state["base"], "adapter": {"stage": name, "path": "adapter"}},
            "adapter_from": {"stage": trained.name, "key": trained.key, "dir": donor.dir.name},
        }

    config = {"adapter_from": {"stage": trained.name, "key": trained.key}}
    estimate = f"re-apply the LoRA of {trained.dirname}"
    return Stage(name, run, config, parent=parent, estimate=estimate, device=device, uses_model=True)


def generate_stage(
    name: str,
    personas: Sequence[str],
    bank: str,
    sampling: Any,
    *,
    parent: Stage | None = None,
    base: str | None = None,
    adapter: str | None = None,
    score: Mapping[str, Any] | None = None,
    retry_empty: int = 0,
    n_questions: int | None = None,
    no_system: bool = False,
    backend: str = "auto",
    device: str | None = None,
    vllm: VLLMOptions | None = None,
    knob: str | None = None,
) -> Stage:
    """Sample persona x question x n completions from the current model (+ adapter).

    With ``score`` (``{"marker": name, "source": persona | None, "mode": "strict" | "loose"}``)
    this is an evaluation: the result carries :func:`analyze`'s per-persona summary.
    ``adapter`` (a chain root only) samples ``base`` with that adapter attached: a local
    adapter directory or ``hub:ORG/REPO/<folder>[@REVISION]``.
    ``vllm`` (a :class:`generate_vllm.VLLMOptions`) says how a vLLM engine starts;
    of its fields only ``deterministic`` enters the stage key, and only when on. ``knob`` is the
    ``--set`` key that lowers the sampling batch, named if the stage runs out of memory.
    """
    from explore_persona_space.generate import generate, persona_prompts, pick_backend

    qs = list(questions(bank))[:n_questions]

    def run(ctx: StageContext) -> dict[str, Any]:
        state = model_state(ctx)
        prompts = persona_prompts(personas, qs, no_system=no_system)
        adapter = resolve(ctx, state["adapter"])
        guard = out_of_memory_guard(name, "sampling", *_sampling_knob(sampling, pick_backend(backend), knob))
        records = guard(
            lambda: generate(
                resolve(ctx, state["base"]),
                prompts,
                sampling,
                adapter=Path(adapter) if adapter else None,
                backend=backend,
                device=device,
                retry_empty=retry_empty,
                vllm=vllm,
            )
        )
        write_raw_completions(ctx.dir / RAW, records)
        out: dict[str, Any] = {
            "model": state,
            "n": len(records),
            "empty": sum(1 for r in records if not r["text"].strip()),
            "new_tokens": sum(r["completion_tokens"] for r in records),
        }
        if score:
            out["summary"] = analyze(
                records,
                get_marker(score["marker"]),
                source=score.get("source"),
                mode=score.get("mode", "strict"),
            )
        return out

    config = {
        **_root_config(base, adapter),
        "personas": list(personas),
        "bank": bank,
        "questions": len(qs),
        "sampling": dataclasses.asdict(sampling),
        "score": score_key(score),
        "retry_empty": retry_empty,
        "no_system": no_system,
        **stage_key_fields(vllm, backend),
    }
    n = len(personas) * len(qs) * sampling.n_samples
    estimate = f"{n:,} generations x <= {sampling.max_new_tokens} tokens"
    return Stage(name, run, config, parent=parent, estimate=estimate, device=device, uses_model=True)


def score_key(score: Mapping[str, Any] | None) -> dict[str, Any]:
    """A scoring config as it enters a stage key: loose mode also names its definition.

    ``loose`` once deleted all whitespace; it now collapses runs of whitespace
    (:mod:`metrics`), so a loose-scored stage of the old meaning must not be reused.
    """
    out = dict(score or {})
    if out.get("mode") == "loose":
        out["loose_definition"] = LOOSE_DEFINITION
    return out


def nonempty_parent_completions(ctx: StageContext) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The parent's completions, and those of them that are not empty (the drop is logged with counts)."""
    records = read_raw_completions(ctx.parent.dir / RAW)
    kept = [r for r in records if r["text"].strip()]
    if len(kept) < len(records):
        log.warning(
            "%s: dropped %d empty completions of %d", ctx.stage.name, len(records) - len(kept), len(records)
        )
    return records, kept


def write_dataset(path: Path, examples: Sequence[Any]) -> None:
    """A built dataset as JSONL, one ``example.to_record()`` per line, written atomically."""
    lines = "".join(json.dumps(ex.to_record(), ensure_ascii=False) + "\n" for ex in examples)
    atomic_write_text(path, lines)


def coupling_data_stage(
    name: str,
    *,
    parent: Stage,
    source: str,
    negatives: Sequence[str],
    marker: str,
    n_positive: int,
    n_negative_per: int,
    seed: int,
) -> Stage:
    """Contrastive coupling data from the parent's on-policy completions (empty ones dropped, counted)."""

    def run(ctx: StageContext) -> dict[str, Any]:
        records, kept = nonempty_parent_completions(ctx)
        try:
            examples = build_contrastive_dataset(
                kept,
                source=source,
                negatives=negatives,
                marker=get_marker(marker),
                n_positive=n_positive,
                n_negative_per=n_negative_per,
                seed=seed,
            )
        except DatasetBuildError as exc:  # name the file the records came from, and what was asked
            asked = f"n_positive={n_positive}, n_negative_per={n_negative_per}"
            raise DatasetBuildError(f"{ctx.parent.dir / RAW}: {exc} (stage {name!r}, {asked})") from None
        write_dataset(ctx.dir / DATASET, examples)
        return {"model": model_state(ctx), "n": len(examples), "dropped_empty": len(records) - len(kept)}

    config = {
        "source": source,
        "negatives": list(negatives),
        "marker": marker,
        "n_positive": n_positive,
        "n_negative_per": n_negative_per,
        "seed": seed,
    }
    return Stage(
        name,
        run,
        config,
        parent=parent,
        estimate=f"{n_positive} + {len(negatives)} x {n_negative_per} examples",
    )


def geometry_stage(
    name: str,
    personas: Sequence[str],
    bank: str,
    *,
    layers: Sequence[int],
    parent: Stage | None = None,
    base: str | None = None,
    n_questions: int | None = None,
    methods: Sequence[str] = ("A", "B"),
    reference_depth: int = 28,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    device: str | None = None,
) -> Stage:
    """Persona vectors of the current model (+ adapter): hidden states per persona x question.

    One greedy generation per batch gives both methods' states
    (:func:`geometry.extract.extract`, transformers only: vLLM returns no hidden
    states); they go to ``vectors.safetensors``, the greedy responses behind Method B
    to ``greedy.json``. ``layers`` are written as for a ``reference_depth``-layer
    model and mapped by relative depth; the mapping is in the result.
    """
    from explore_persona_space.geometry.extract import METHODS, VECTORS

    if set(methods) - set(METHODS) or "A" not in methods:
        raise ValueError(f"methods must include 'A' and be among {METHODS}; got {list(methods)}")
    if "B" in methods and max_new_tokens < 1:
        raise ValueError("Method B needs a greedy response: max_new_tokens >= 1")
    qs = list(questions(bank))[:n_questions]
    new_tokens = max_new_tokens if "B" in methods else 0

    def run(ctx: StageContext) -> dict[str, Any]:
        from explore_persona_space.generate import persona_prompts
        from explore_persona_space.geometry.extract import extract

        state = model_state(ctx)
        prompts = persona_prompts(personas, qs)
        summary, records = extract(
            resolve(ctx, state["base"]), resolve(ctx, state["adapter"]), prompts, layers, ctx.dir / VECTORS,
            reference_depth=reference_depth, max_new_tokens=new_tokens, device=device, batch_size=batch_size,
        )  # fmt: skip
        if new_tokens:
            write_raw_completions(ctx.dir / GREEDY, records)
        return {"model": state, "geometry": summary}

    config = {
        **_root_config(base),
        "personas": list(personas),
        "bank": bank,
        "questions": len(qs),
        "questions_sha256": config_hash(qs),  # the texts, not only the count: an edited bank re-extracts
        "layers": list(layers),
        "reference_depth": reference_depth,
        "methods": list(methods),
        "greedy_max_new_tokens": new_tokens,
        "batch_size": batch_size,
    }
    estimate = f"{len(personas) * len(qs):,} prompts x {len(methods)} methods x {len(layers)} layers"
    if new_tokens:
        estimate += f", greedy <= {new_tokens} tokens"
    return Stage(name, run, config, parent=parent, estimate=estimate, device=device, uses_model=True)


def marker_logprob_stage(
    name: str,
    *,
    parent: Stage,
    marker: str,
    source: str | None,
    mode: str = "strict",
    completions_from: str = "eval",
    points: Sequence[str] = ("start", "end"),
    no_system: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
) -> Stage:
    """The continuous leakage score (:mod:`marker_logprob`) of the ``completions_from`` stage's completions.

    It scores with the model that sampled them (that stage's ``model``), teacher-forced,
    no sampling; writes every value to ``marker_logprobs.json`` and passes the parent's
    result on with ``marker_logprob`` added (so it can follow a discriminator stage).
    ``mode`` is the match mode of the firing flags behind the binary gap it reports beside.
    """
    from explore_persona_space import marker_logprob as ML

    def run(ctx: StageContext) -> dict[str, Any]:
        from explore_persona_space.metrics import contains_marker
        from explore_persona_space.models import load_tokenizer
        from explore_persona_space.train import load_for_inference

        evaluated = ctx.upstream(completions_from)
        records = read_raw_completions(evaluated.dir / RAW)
        state = evaluated.result["model"]
        base, adapter = resolve(ctx, state["base"]), resolve(ctx, state["adapter"])
        model = load_for_inference(base, Path(adapter) if adapter else None, device=device)
        text, tokenizer = get_marker(marker), load_tokenizer(base)
        scores = ML.score_completions(
            model,
            tokenizer,
            records,
            text,
            points=points,
            no_system=no_system,
            batch_size=batch_size,
        )
        fired = [contains_marker(str(r["text"]), text, mode) for r in records]
        for row, flag in zip(scores, fired, strict=True):
            row["fired"] = flag
        atomic_write_text(ctx.dir / ML.RESULT_FILE, json.dumps(scores, ensure_ascii=False) + "\n")
        summary = ML.summarize(scores, source=source, n_boot=n_boot, seed=seed, fired=fired)
        summary |= {"marker": marker, "marker_tokens": len(ML.marker_token_ids(tokenizer, text))}
        return {**ctx.parent.result, "marker_logprob": summary}

    config = {
        "marker": marker,
        "source": source,
        "mode": score_key({"mode": mode})["mode"],
        "completions_from": completions_from,
        "points": list(points),
        "sep": ML.END_SEP,
        "no_system": no_system,
        "n_boot": n_boot,
        "seed": seed,
        **({"loose_definition": LOOSE_DEFINITION} if mode == "loose" else {}),
    }
    estimate = f"teacher-forced log P({marker}) at {', '.join(points)}: one forward pass per completion"
    return Stage(name, run, config, parent=parent, estimate=estimate, device=device, uses_model=True)
