"""GPU baseline: LoRA training tokens/s and generation new-tokens/s beside the hardware's bounds.

Why: a full #247 cell is ~12,000 coupling sequences of training plus 3,360
sampled completions; this measures how fast the package's plain paths do that
work on a Qwen2.5-7B-shaped model and how far they are from the physical floor.

Steps, all in one process on one GPU:
1. Measure the device: bf16 matmul TFLOP/s (8192^3 products) and device-to-device
   copy bandwidth (bytes read + written).
2. Real coupling data: on-policy completions of the embedded model for the #247
   trigger and negative personas (40 data questions x 5 samples each, T=1,
   512 tokens), built into the coupling dataset (200 positives + 2 x 200
   negatives) and masked with the coupling loss. Token lengths come from the
   embedded model's tokenizer (Qwen's larger vocabulary would give slightly
   fewer tokens for the same text).
3. A Qwen2.5-7B-shaped model with random bf16 weights (no download).
4. Training: the package's SFTTrainer path (train.build_trainer) with the
   coupling recipe (batch 16 = 4 x 4 accumulation, gradient checkpointing on
   CUDA), timed over optimizer steps after warm-up.
   Bound = matmul FLOP/s / (4 x params) tokens/s (forward 2N + input-gradient 2N).
5. Generation: plain ``model.generate()`` (what the transformers backend calls)
   on the #247 eval prompts (12 personas x 28 questions x 10 samples), left
   padding, T=1, top_p=1, up to 512 new tokens, batch 256. Random weights
   rarely emit the stop token, so nearly every row runs the full 512 tokens.
   Bound = batch / ((weight bytes + KV bytes at mean context) / copy bandwidth).

Usage (on a GPU machine):
    uv run python scripts/bench_train_generate.py --out bench.json
    uv run python scripts/bench_train_generate.py --train-steps 12 --gen-prompts 512   # a shorter run
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from explore_persona_space import generate as gen
from explore_persona_space import models, train
from explore_persona_space.data import build_contrastive_dataset
from explore_persona_space.loss_masks import tokenize_dataset
from explore_persona_space.personas import eval_personas_with, get_marker, questions
from explore_persona_space.results import (
    atomic_write_json,
    hardware,
    read_raw_completions,
    write_raw_completions,
)

TRIGGER, NEGATIVES, MARKER = "confab", ("medical_doctor", "french_person"), "zlt"


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def copy_bandwidth(gib: float = 2.0, reps: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * reps / (time.perf_counter() - t)


def coupling_data(work: Path, samples: int, max_new_tokens: int) -> tuple[list, dict]:
    raw = work / "onpolicy_raw_completions.json"
    started = time.perf_counter()
    if not raw.is_file():
        prompts = gen.persona_prompts([TRIGGER, *NEGATIVES], questions("data"))
        cfg = gen.SamplingConfig(n_samples=samples, max_new_tokens=max_new_tokens, batch_size=1024)
        write_raw_completions(raw, gen.generate(models.EMBEDDED_ALIAS, prompts, cfg, retry_empty=3))
    records = [r for r in read_raw_completions(raw) if r["text"].strip()]
    seconds = time.perf_counter() - started
    n_new = sum(r["completion_tokens"] for r in records)
    data = build_contrastive_dataset(
        records,
        source=TRIGGER,
        negatives=NEGATIVES,
        marker=get_marker(MARKER),
        n_positive=200,
        n_negative_per=200,
        seed=42,
    )
    info = {
        "onpolicy_completions": len(records),
        "onpolicy_new_tokens": n_new,
        "onpolicy_seconds": round(seconds, 1),
    }
    return data, info


def qwen7b_random() -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(models.qwen25_7b_config(), dtype=torch.bfloat16)
    return model


class StepClock(TrainerCallback):
    """Wall time and cumulative input tokens at every logged optimizer step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), float(logs["num_tokens"])))


def bench_train(model, tokenizer, data, steps: int, warmup: int, work: Path, flops: float) -> dict:
    cfg = dataclasses.replace(train.COUPLING_RECIPE, max_steps=steps)
    tokenized = tokenize_dataset(tokenizer, data, cfg.loss, cfg.max_length)
    lengths = sorted(len(t.input_ids) for t in tokenized)
    params = sum(p.numel() for p in model.parameters())  # the base alone, before the LoRA is attached
    clock = StepClock()
    torch.cuda.reset_peak_memory_stats()
    trainer = train.build_trainer(
        model, tokenizer, tokenized, cfg, work / "trainer", progress=False, callbacks=[clock]
    )
    trainer.train()
    (t0, n0), (t1, n1) = clock.marks[warmup - 1], clock.marks[-1]
    tps = (n1 - n0) / (t1 - t0)
    bound = flops * 1e12 / (4 * params)
    trainer.model.unload()  # drop the LoRA layers; the base stays for generation
    return {
        "params": params,
        "steps_timed": len(clock.marks) - warmup,
        "tokens_per_s": round(tps),
        "bound_tokens_per_s": round(bound),
        "fraction_of_bound": round(tps / bound, 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "length_mean": round(statistics.mean(lengths), 1),
        "length_p50": lengths[len(lengths) // 2],
        "length_p90": lengths[int(0.9 * len(lengths))],
        "length_max": lengths[-1],
        "n_sequences": len(lengths),
        "micro_batch": cfg.micro_batch_size,
        "accumulation": cfg.accumulation,
        "gradient_checkpointing": True,
    }


def bench_generate(model, tokenizer, n_prompts: int, batch: int, max_new: int, bandwidth: float) -> dict:
    prompts = gen.persona_prompts(eval_personas_with(TRIGGER), questions("eval"))
    ids = gen.encode_prompts(tokenizer, prompts)
    rows = sorted((ids * ((n_prompts + len(ids) - 1) // len(ids)))[:n_prompts], key=len)
    stop = gen.stop_token_ids(tokenizer)
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    new_tokens, started = 0, time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        width = max(map(len, chunk))
        x = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in chunk], device="cuda")
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device="cuda")
        out = model.generate(
            input_ids=x,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,  # transformers would otherwise apply its default top-k of 50
            max_new_tokens=max_new,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, width:]
        new_tokens += int((new != tokenizer.pad_token_id).sum())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    kv_per_token = (
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    )
    mean_ctx = statistics.mean(map(len, rows)) + max_new / 2
    step_bytes = 2 * params + batch * mean_ctx * kv_per_token
    bound = batch / (step_bytes / bandwidth)
    tps = new_tokens / seconds
    return {
        "prompts": len(rows),
        "batch": batch,
        "max_new_tokens": max_new,
        "new_tokens": new_tokens,
        "seconds": round(seconds, 1),
        "new_tokens_per_s": round(tps),
        "bound_new_tokens_per_s": round(bound),
        "fraction_of_bound": round(tps / bound, 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work", type=Path, default=Path(".cache/bench"), help="scratch dir (on-policy data cache)"
    )
    ap.add_argument("--out", type=Path, help="write the numbers as JSON here")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--gen-prompts", type=int, default=3360)
    ap.add_argument("--gen-batch", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--onpolicy-samples", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    args.work.mkdir(parents=True, exist_ok=True)
    device = {"tflops_bf16": round(matmul_tflops(), 1), "copy_bytes_per_s": copy_bandwidth()}
    print(
        f"device: {torch.cuda.get_device_name()}  matmul {device['tflops_bf16']} TFLOP/s  "
        f"copy {device['copy_bytes_per_s'] / 1e12:.2f} TB/s"
    )
    tokenizer = models.load_tokenizer(models.EMBEDDED_ALIAS)
    data, onpolicy = coupling_data(args.work, args.onpolicy_samples, args.max_new_tokens)
    print(f"coupling data: {len(data)} examples from {onpolicy}")
    model = qwen7b_random()
    tr = bench_train(
        model, tokenizer, data, args.train_steps, args.warmup_steps, args.work, device["tflops_bf16"]
    )
    print(
        f"train: {tr['tokens_per_s']} tok/s vs bound {tr['bound_tokens_per_s']} "
        f"({tr['fraction_of_bound']:.1%}), peak {tr['peak_mem_gib']} GiB, lengths mean {tr['length_mean']} "
        f"p90 {tr['length_p90']} max {tr['length_max']}"
    )
    ge = bench_generate(
        model, tokenizer, args.gen_prompts, args.gen_batch, args.max_new_tokens, device["copy_bytes_per_s"]
    )
    print(
        f"generate: {ge['new_tokens_per_s']} new tok/s vs bound {ge['bound_new_tokens_per_s']} "
        f"({ge['fraction_of_bound']:.1%}), {ge['new_tokens']} tokens in {ge['seconds']} s, "
        f"peak {ge['peak_mem_gib']} GiB"
    )
    if args.out:
        atomic_write_json(
            args.out,
            {
                "device": device,
                "hardware": hardware(),
                "onpolicy": onpolicy,
                "train": tr,
                "generate": ge,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
        )


if __name__ == "__main__":
    main()
