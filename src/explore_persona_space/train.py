"""LoRA SFT on TRL + PEFT with the project's own loss masks, plus merge and reload.

Recipes carry PROTOCOL.md's full-scale numbers; scripts derive smoke variants
from them with ``dataclasses.replace`` in one visible place. The label mask is
built by :mod:`explore_persona_space.loss_masks` and handed to TRL's
``SFTTrainer`` as a pre-tokenized dataset (``skip_prepare_dataset``), so TRL
never re-derives a mask of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explore_persona_space.data import ChatExample
from explore_persona_space.loss_masks import IGNORE, LossSpec, TokenizedExample, tokenize_dataset
from explore_persona_space.models import (
    drop_resident,
    keep_resident,
    load_model,
    load_tokenizer,
    pick_device,
    resident_model,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    """One LoRA SFT run. Defaults are the #247 coupling recipe (stage 2) at full scale."""

    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    targets: tuple[str, ...] = ALL_PROJECTIONS
    use_rslora: bool = False
    learning_rate: float = 5e-6
    epochs: float = 20
    max_steps: int = -1  # > 0 overrides epochs
    scheduler: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 16  # effective: micro_batch_size x accumulation
    micro_batch_size: int = 4
    max_length: int = 2048
    seed: int = 42
    loss: LossSpec = field(default_factory=LossSpec)
    # None: off on CPU; on CUDA off when activations_fit() says the micro-batch fits without it.
    gradient_checkpointing: bool | None = None
    # Concatenate a micro-batch's examples into one row with per-example position ids
    # (no padding, no packing across batches: the same examples as the padded batch).
    padding_free: bool | None = None  # None: on (CPU too since 2026-12-02: 7% faster, BENCHMARKS.md)
    # Padding-free batches through a varlen flash kernel instead of SDPA's block-diagonal mask.
    varlen_attention: bool = True  # used only where padding-free, CUDA and the kernel are all there
    skip_lora_input_casts: bool = True  # under bf16 autocast only; see _skip_lora_input_casts
    # CUDA, checkpointing left to activations_fit(): train on the largest micro-batch (a divisor of
    # batch_size, at least micro_batch_size) that fits without checkpointing. The loss is
    # normalised over the whole optimizer step, so micro-batching does not change it; fewer,
    # larger micro-batches only cut per-kernel overhead (it dominates for small models).
    grow_micro_batch: bool = True
    # The loss with the LM head applied only at scored positions (scored_loss); TRL's fused head
    # already does that on CUDA and scores every position elsewhere. None: on off CUDA.
    scored_loss: bool | None = None

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


COUPLING_RECIPE = TrainConfig()
STAGE1_SFT_RECIPE = TrainConfig(
    learning_rate=1e-4,
    epochs=1,
    weight_decay=0.01,
    loss=LossSpec(mode="assistant_only", eos_in_loss=True),
)
TWO_MARKER_RECIPE = TrainConfig(
    r=16,
    alpha=32,
    learning_rate=1e-5,
    epochs=3,
    scheduler="cosine",
    warmup_ratio=0.05,
    max_length=1024,
    loss=LossSpec(mode="full_token", eos_in_loss=True),
)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    steps: int
    n_examples: int
    n_tokens: int  # input tokens per epoch
    n_loss_tokens: int
    losses: list[float]  # training loss at each logged optimizer step
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adapter_dir"] = str(self.adapter_dir)
        return d


def lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        use_rslora=cfg.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def use_padding_free(cfg: TrainConfig) -> bool:
    """Padding-free batches unless the recipe says no (on CPU and CUDA alike)."""
    return cfg.padding_free is not False


# Activation bytes kept for backward per token and decoder layer, in units of
# (18 x hidden + 4 x intermediate) bf16 values: fitted to a LoRA r=32 run on the
# Qwen2.5-7B shape without checkpointing (51.2 GiB peak at 8 sequences of <= 604
# tokens, padding-free, on an H100; BENCHMARKS.md).
_ACT_HIDDEN, _ACT_INTERMEDIATE, _ACT_BYTES = 18, 4, 2


def activations_fit(
    model: PreTrainedModel, tokenized: Sequence[TokenizedExample], cfg: TrainConfig, device: str
) -> bool:
    """Whether the largest micro-batch trains without gradient checkpointing on this CUDA device.

    Checkpointing recomputes the forward pass in backward (a third more work);
    it is only worth it where the activations would not fit.
    """
    import torch

    lengths = sorted((len(t.input_ids) for t in tokenized), reverse=True)[: cfg.micro_batch_size]
    padded = not use_padding_free(cfg)
    tokens = len(lengths) * lengths[0] if padded else sum(lengths)
    conf = model.config.get_text_config()
    per_token = (
        conf.num_hidden_layers
        * (_ACT_HIDDEN * conf.hidden_size + _ACT_INTERMEDIATE * conf.intermediate_size)
        * _ACT_BYTES
    )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    need = weights + 1.15 * tokens * per_token + 4 * 2**30
    log.debug("activation estimate %.1f GiB of %.1f GiB", need / 2**30, total / 2**30)
    return need < 0.9 * total


def _fitting_micro_batch(
    model: PreTrainedModel, tokenized: Sequence[TokenizedExample], cfg: TrainConfig, device: str
) -> TrainConfig:
    if not cfg.grow_micro_batch:
        return cfg
    for size in range(cfg.batch_size, cfg.micro_batch_size, -1):
        if cfg.batch_size % size == 0:
            grown = dataclasses.replace(cfg, micro_batch_size=size)
            if activations_fit(model, tokenized, grown, device):
                log.info("micro-batch %d (of %d) fits without checkpointing", size, cfg.batch_size)
                return grown
    return cfg


def _sft_args(cfg: TrainConfig, device: str, out: Path, progress: bool, checkpointing: bool) -> Any:
    from trl import SFTConfig

    cuda = device.startswith("cuda")
    return SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.accumulation,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_betas[0],
        adam_beta2=cfg.adam_betas[1],
        adam_epsilon=cfg.adam_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        max_length=None,  # truncation happened when the masks were built
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",  # no stock integration: a tracked stage gets tracking.trainer_callbacks()
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tokenized: Sequence[TokenizedExample],
    cfg: TrainConfig,
    work_dir: Path,
    *,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A TRL ``SFTTrainer`` over pre-masked examples, with a fresh LoRA on ``model``.

    Separate from :func:`train_lora` so a caller holding a loaded model (the
    benchmark's random-weight 7B, a base kept resident between stages) drives
    exactly the same training path.
    """
    from datasets import Dataset
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if not any(t.n_loss for t in tokenized):
        raise ValueError("no example carries any loss; check the loss mode and eos_in_loss")
    set_seed(cfg.seed)  # LoRA init happens inside the trainer
    dataset = Dataset.from_dict(
        {"input_ids": [t.input_ids for t in tokenized], "labels": [t.labels for t in tokenized]}
    )
    device = str(next(model.parameters()).device)
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None and device.startswith("cuda"):
        cfg = _fitting_micro_batch(model, tokenized, cfg, device)
        checkpointing = not activations_fit(model, tokenized, cfg, device)
    scored = not device.startswith("cuda") if cfg.scored_loss is None else cfg.scored_loss
    trainer_class = _scored_positions_trainer() if scored else SFTTrainer
    trainer = trainer_class(
        model=model,
        args=_sft_args(cfg, device, Path(work_dir), progress, checkpointing),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        data_collator=DataCollatorForLanguageModeling(
            pad_token_id=tokenizer.pad_token_id, padding_free=use_padding_free(cfg)
        ),
        callbacks=list(callbacks) or None,
    )
    if not progress:  # the printer callback would dump every step's log dict to stdout
        trainer.remove_callback(PrinterCallback)
    if not trainer.args.gradient_checkpointing and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()  # a resident model keeps the last trainer's setting otherwise
    if trainer.args.bf16 and cfg.skip_lora_input_casts:
        _skip_lora_input_casts(trainer.model)
    return trainer


def loss_positions(labels: Any) -> Any:
    """Logit positions any row of the batch is scored at: t where ``labels[:, t + 1]`` is kept."""
    return (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(-1)


def scored_loss(model: Any, inputs: Mapping[str, Any], num_items_in_batch: Any = None) -> Any:
    """Next-token cross-entropy with the LM head applied only where some row carries loss.

    The marker-only coupling loss scores a few tokens at the end of each answer,
    yet TRL projects every position onto the vocabulary (and computes entropy and
    accuracy metrics over it) on devices without Triton; BENCHMARKS.md (#15) has
    the CPU step times before and after. The model's own ``logits_to_keep`` takes
    the union of the batch's scored positions. Same loss and gradients as the full projection, up to float
    rounding: the sum over kept tokens divided by ``num_items_in_batch`` (the
    trainer's token count over the accumulated micro-batches), else their number.
    """
    import torch

    labels = inputs["labels"]
    positions = loss_positions(labels)
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**forward, use_cache=False, logits_to_keep=positions).logits
    targets = labels[:, 1:][:, positions]
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum()
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


def _scored_positions_trainer() -> Any:
    """``SFTTrainer`` whose loss is :func:`scored_loss` (TrainConfig.scored_loss; default off CUDA)."""
    from trl import SFTTrainer

    class ScoredPositionsTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            packed_or_masked = "attention_mask" in inputs or "position_ids" in inputs
            if return_outputs or "labels" not in inputs or not packed_or_masked:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return scored_loss(model, inputs, num_items_in_batch)

    return ScoredPositionsTrainer


def _skip_lora_input_casts(model: Any) -> None:
    """Under bf16 autocast, stop PEFT casting each LoRA input to the fp32 adapter dtype.

    Autocast casts it straight back to bf16 for the LoRA matmuls, so the cast
    only adds two copies of every projection input per layer (15% of GPU time in
    a 7B profile); the values reaching the matmuls are the same bf16 numbers.
    """
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def run_trainer(trainer: Any, cfg: TrainConfig) -> None:
    """``trainer.train()``, with varlen attention for padding-free batches where it applies."""
    from explore_persona_space.fast_attention import varlen_attention

    wanted = cfg.varlen_attention and use_padding_free(cfg)
    with varlen_attention(trainer.model, enabled=wanted):
        trainer.train()


def train_lora(
    base: str,
    examples: Sequence[ChatExample | Mapping[str, Any]],
    cfg: TrainConfig,
    out_dir: Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA adapter on ``base`` (alias, hub id or local dir) and save it to ``out_dir``.

    The adapter is written to a temporary sibling and renamed into place, so
    ``out_dir`` exists only once training finished.
    """
    from explore_persona_space.tracking import trainer_callbacks

    started = time.perf_counter()
    tokenizer = load_tokenizer(base)
    tokenized = tokenize_dataset(tokenizer, examples, cfg.loss, cfg.max_length)
    device = pick_device(device)
    resident = keep_resident(device)
    model = (resident_model if resident else load_model)(base, device=device, dtype=dtype)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-train-", dir=out_dir.parent))
    try:
        curves = trainer_callbacks()  # the tracked cell's run, when a stage of one is training
        trainer = build_trainer(
            model, tokenizer, tokenized, cfg, work / "trainer", progress=progress, callbacks=curves
        )
        run_trainer(trainer, cfg)
        adapter_tmp = work / "adapter"
        trainer.model.save_pretrained(adapter_tmp)
        tokenizer.save_pretrained(adapter_tmp)
        steps = trainer.state.global_step
        losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
        if resident:  # hand the base back without its LoRA layers for the next stage
            trainer.model.unload()
            model.eval()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        adapter_tmp.rename(out_dir)
    except BaseException:
        if resident:  # it may still carry this run's LoRA layers: never hand that to another stage
            drop_resident()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return TrainResult(
        adapter_dir=out_dir,
        steps=steps,
        n_examples=len(tokenized),
        n_tokens=sum(len(t.input_ids) for t in tokenized),
        n_loss_tokens=sum(t.n_loss for t in tokenized),
        losses=losses,
        seconds=time.perf_counter() - started,
    )


def load_with_adapter(
    base: str, adapter_dir: Path, *, device: str | None = None, dtype: str | None = None
) -> PreTrainedModel:
    """Base model with a saved adapter attached (unmerged), ready for generation or scoring."""
    from peft import PeftModel

    model = load_model(base, device=device, dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def load_for_inference(
    base: str, adapter_dir: Path | None, *, device: str | None = None, dtype: str | None = None
) -> PreTrainedModel:
    """Base model with its saved adapter, if any, for sampling or scoring: folded into fp32, else attached.

    On fp32 weights (CPU) a plain LoRA is folded by :func:`fold_lora` (PEFT's
    ``merge_and_unload`` otherwise): the same weights up to fp32 rounding, without the
    adapter's per-layer extra products (the #247 smoke's eval shape sampled in
    24-25 s + 2.2 s to merge against 29.6-32.4 s attached, BENCHMARKS.md); on bf16 a merge
    would round the merged weights, so the adapter stays attached there.
    """
    import torch

    model = load_model(base, device=device, dtype=dtype)
    if adapter_dir is None:
        return model.eval()
    if next(model.parameters()).dtype == torch.float32 and fold_lora(model, Path(adapter_dir)):
        return model.eval()
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return model.merge_and_unload() if next(model.parameters()).dtype == torch.float32 else model


# adapter_config.json keys that do not change what a saved LoRA's weights add to its base
_FOLD_NEUTRAL = {
    "base_model_name_or_path", "target_modules", "r", "lora_alpha", "use_rslora", "lora_dropout",
    "task_type", "peft_type", "peft_version", "inference_mode", "init_lora_weights", "revision",
    "megatron_core", "qalora_group_size", "layers_pattern", "layers_to_transform", "exclude_modules",
    "auto_mapping", "bias",
}  # fmt: skip
_PREFIX = "base_model.model."


def fold_lora(model: PreTrainedModel, adapter_dir: Path) -> bool:
    """Add a saved plain LoRA's ``scaling x B @ A`` to ``model``'s weights in place, without PEFT.

    PEFT's ``merge_and_unload`` computes the same sum but first builds a LoRA layer
    for every target (about 2 s for the embedded model's 210). Anything but a plain
    LoRA on ``nn.Linear`` layers - any config option outside the neutral ones set
    (DoRA, biases, saved modules, rank patterns, ...), or weights of another shape -
    returns False with ``model`` untouched, for PEFT to do.
    """
    import json

    import torch
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    weights_file = adapter_dir / "adapter_model.safetensors"
    if cfg.get("peft_type") != "LORA" or cfg.get("bias", "none") != "none" or not weights_file.is_file():
        return False
    if any(value not in (None, False, {}, [], "") for key, value in cfg.items() if key not in _FOLD_NEUTRAL):
        return False
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        path, _, part = key.removeprefix(_PREFIX).rpartition(".lora_")
        if not key.startswith(_PREFIX) or part not in ("A.weight", "B.weight"):
            return False
        pairs.setdefault(path, {})[part] = tensor
    for path, ab in pairs.items():
        try:
            module = model.get_submodule(path) if path else None
        except AttributeError:  # a module this model does not have
            return False
        if not isinstance(module, torch.nn.Linear) or set(ab) != {"A.weight", "B.weight"}:
            return False
        if ab["B.weight"].shape[0] != module.out_features or ab["A.weight"].shape[1] != module.in_features:
            return False
    r = cfg["r"]
    scaling = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    with torch.no_grad():
        for path, ab in pairs.items():
            weight = model.get_submodule(path).weight
            a, b = (ab[k].to(weight.device, weight.dtype) for k in ("A.weight", "B.weight"))
            weight += (b @ a) * scaling
    return True


def merge_adapter(
    base: str, adapter_dir: Path, out_dir: Path, *, device: str | None = None, dtype: str | None = None
) -> Path:
    """Fold an adapter into its base and save a full model (the stage-1 base under a stage-2 LoRA)."""
    out_dir = Path(out_dir)
    model = load_for_inference(base, adapter_dir, device=device, dtype=dtype)
    if hasattr(model, "merge_and_unload"):  # bf16: load_for_inference leaves the adapter attached
        model = model.merge_and_unload()
    tokenizer = load_tokenizer(base)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-merge-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def masked_loss(
    model: PreTrainedModel,
    tokenized: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int = 8,
) -> float:
    """Mean cross-entropy over the loss-carrying tokens (teacher-forced, no gradient)."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(tokenized), batch_size):
            chunk = tokenized[i : i + batch_size]
            width = max(len(t.input_ids) for t in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, t in enumerate(chunk):
                ids[row, : len(t.input_ids)] = torch.tensor(t.input_ids)
                labels[row, : len(t.labels)] = torch.tensor(t.labels)
                mask[row, : len(t.input_ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shifted = labels[:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += int((shifted != IGNORE).sum())
    return total / count if count else math.nan
