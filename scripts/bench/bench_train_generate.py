"""GPU benchmark: the plain and the optimized training and generation paths, back to back, beside the bounds.

Why: a full #247 cell is ~12,000 coupling sequences of training plus 3,360
sampled completions; this measures how fast the package does that work on a
Qwen2.5-7B-shaped model, with the pre-#7 ("plain") settings and with the
defaults, in one process, and how far each is from the physical floor.

Steps, all in one process on one GPU:
1. Measure the device: bf16 matmul TFLOP/s (8192^3 products) and device-to-device
   copy bandwidth (bytes read + written).
2. Real coupling data: on-policy completions of the embedded model for the #247
   trigger and negative personas (40 data questions x 5 samples, T=1, 512
   tokens), or a raw-completions file given with --onpolicy; built into the
   coupling dataset (200 positives + 2 x 200 negatives), coupling loss mask,
   embedded tokenizer.
3. A Qwen2.5-7B-shaped model with random bf16 weights (no download).
4. Training, the package's SFTTrainer path (train.build_trainer + run_trainer),
   coupling recipe at batch 16, the same seed and data order for both rows:
   plain = 4 x 4 padded micro-batches, gradient checkpointing, SDPA, PEFT input
   casts; optimized = the defaults (8 x 2 padding-free micro-batches, varlen
   flash attention, checkpointing only if the activations do not fit, no input
   casts). Loss per optimizer step is compared between the two.
   Bound = matmul FLOP/s / (4 x base params) tokens/s (forward 2N + input-gradient 2N).
5. Generation, the transformers backend's loop (generate.hf_sample) on the #247
   eval prompts (12 personas x 28 questions x 10 samples), T=1, top_p=1, up to
   512 new tokens; plain = fast_decode off at batch 256 (dynamic cache, SDPA),
   optimized = the CUDA defaults (static cache compiled to CUDA graphs, 512-row
   batches of one shape, grouped-head decode attention). Random weights never
   emit the stop token, so every row runs the full 512 tokens.
   Bound per step = max(weights + KV bytes at mean context / copy bandwidth,
   2 x params x batch / matmul FLOP/s).

Usage (on a GPU machine):
    uv run python scripts/bench/bench_train_generate.py --out bench.json
    uv run python scripts/bench/bench_train_generate.py --plain-rows 512 --fast-rows 1536   # a shorter run
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
from explore_persona_space.bench import bounds
from explore_persona_space.bench.cell import MARKER, NEGATIVES, TRIGGER
from explore_persona_space.data import build_contrastive_dataset
from explore_persona_space.loss_masks import tokenize_dataset
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.personas import eval_personas_with, get_marker, questions
from explore_persona_space.results import (
    atomic_write_json,
    hardware,
    read_raw_completions,
    write_raw_completions,
)


def coupling_data(work: Path, onpolicy: Path | None, samples: int, max_new_tokens: int) -> tuple[list, dict]:
    raw = onpolicy or work / "onpolicy_raw_completions.json"
    started = time.perf_counter()
    if not raw.is_file():
        prompts = gen.persona_prompts([TRIGGER, *NEGATIVES], questions("data"))
        cfg = gen.SamplingConfig(n_samples=samples, max_new_tokens=max_new_tokens)
        write_raw_completions(raw, gen.generate(models.EMBEDDED_ALIAS, prompts, cfg, retry_empty=3))
    records = [r for r in read_raw_completions(raw) if r["text"].strip()]
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
        "file": str(raw),
        "onpolicy_completions": len(records),
        "onpolicy_new_tokens": sum(r["completion_tokens"] for r in records),
        "onpolicy_seconds": round(time.perf_counter() - started, 1),
    }
    return data, info


def qwen7b_random() -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(models.qwen25_7b_config(), dtype=torch.bfloat16)
    return model


class StepClock(TrainerCallback):
    """Wall time, cumulative input tokens and loss at every logged optimizer step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), float(logs["num_tokens"]), float(logs["loss"])))


# The pre-#7 training path, spelled out: every lever of #7 off.
PLAIN_TRAIN = dict(
    micro_batch_size=4,
    gradient_checkpointing=True,
    padding_free=False,
    varlen_attention=False,
    skip_lora_input_casts=False,
    grow_micro_batch=False,
)


def bench_train(model, tokenizer, data, cfg, steps: int, warmup: int, work: Path, flops: float) -> dict:
    cfg = dataclasses.replace(cfg, max_steps=steps)
    tokenized = tokenize_dataset(tokenizer, data, cfg.loss, cfg.max_length)
    params = sum(p.numel() for p in model.parameters())  # the base alone, before the LoRA is attached
    clock = StepClock()
    torch.cuda.reset_peak_memory_stats()
    trainer = train.build_trainer(
        model, tokenizer, tokenized, cfg, work / "trainer", progress=False, callbacks=[clock]
    )
    train.run_trainer(trainer, cfg)
    checkpointing = bool(trainer.args.gradient_checkpointing)
    micro = trainer.args.per_device_train_batch_size
    trainer.model.unload()  # drop the LoRA layers; the base stays for the next run
    model.eval()
    (t0, n0, _), (t1, n1, _) = clock.marks[warmup - 1], clock.marks[-1]
    tps = (n1 - n0) / (t1 - t0)
    bound = bounds.lora_train_bound(flops, params)
    lengths = sorted(len(t.input_ids) for t in tokenized)
    return {
        "tokens_per_s": round(tps),
        "bound_tokens_per_s": round(bound),
        "fraction_of_bound": round(tps / bound, 3),
        "seconds_per_step": round((t1 - t0) / (len(clock.marks) - warmup), 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "losses": [round(m[2], 5) for m in clock.marks],
        "steps_timed": len(clock.marks) - warmup,
        "micro_batch": micro,
        "accumulation": cfg.batch_size // micro,
        "gradient_checkpointing": checkpointing,
        "padding_free": train.use_padding_free(cfg),
        "length_mean": round(statistics.mean(lengths), 1),
        "length_p90": lengths[int(0.9 * len(lengths))],
        "length_max": lengths[-1],
    }


class _CountOnly:
    """Stands in for the tokenizer when decoding: random weights emit ids past the embedded vocabulary."""

    def decode(self, ids, **kwargs) -> str:
        return ""


def bench_generate(model, tokenizer, n_rows: int, cfg, bandwidth: float, flops: float) -> dict:
    prompts = gen.persona_prompts(eval_personas_with(TRIGGER), questions("eval"))
    encoded = gen.encode_prompts(tokenizer, prompts)
    protocol_rows = [(i, s) for i in range(len(prompts)) for s in range(10)]
    rows = protocol_rows[:: max(1, len(protocol_rows) // n_rows)][:n_rows]  # every persona, evenly
    stop = gen.stop_token_ids(tokenizer)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    done = gen.hf_sample(model, _CountOnly(), encoded, rows, 0, cfg, stop, tokenizer.pad_token_id, True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    new_tokens = sum(c.completion_tokens for c in done)
    params = sum(p.numel() for p in model.parameters())
    batch = min(len(rows), cfg.fast_batch_size if cfg.fast_decode else cfg.batch_size)
    mean_ctx = statistics.mean(len(encoded[i]) for i, _ in rows) + cfg.max_new_tokens / 2
    bound = bounds.decode_bound(model.config, params, batch, mean_ctx, bandwidth, flops)
    tps = new_tokens / seconds
    return {
        "rows": len(rows),
        "batch": batch,
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
        "--work", type=Path, default=REPO_ROOT / ".cache" / "bench", help="scratch dir (on-policy cache)"
    )
    ap.add_argument("--onpolicy", type=Path, help="raw completions to build the coupling data from")
    ap.add_argument("--tokenizer", default=models.EMBEDDED_ALIAS, help="tokenizer for data and prompts")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON here")
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--plain-rows", type=int, default=512, help="eval rows for the plain generation path")
    ap.add_argument("--fast-rows", type=int, default=1536, help="eval rows for the optimized path")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    args.work.mkdir(parents=True, exist_ok=True)
    device = {"tflops_bf16": round(bounds.matmul_tflops(), 1), "copy_bytes_per_s": bounds.copy_bandwidth()}
    flops, bandwidth = device["tflops_bf16"], device["copy_bytes_per_s"]
    print(f"device: {torch.cuda.get_device_name()}  matmul {flops} TFLOP/s  copy {bandwidth / 1e12:.2f} TB/s")
    tokenizer = models.load_tokenizer(args.tokenizer)
    data, onpolicy = coupling_data(args.work, args.onpolicy, 5, args.max_new_tokens)
    print(f"coupling data: {len(data)} examples from {onpolicy}")
    model = qwen7b_random()
    recipe = dataclasses.replace(train.COUPLING_RECIPE, micro_batch_size=8)
    tr = {
        name: bench_train(model, tokenizer, data, cfg, args.train_steps, args.warmup_steps, args.work, flops)
        for name, cfg in (("plain", dataclasses.replace(recipe, **PLAIN_TRAIN)), ("optimized", recipe))
    }
    loss_gap = max(
        abs(a - b) / abs(a) for a, b in zip(tr["plain"]["losses"], tr["optimized"]["losses"], strict=True)
    )
    sampling = gen.SamplingConfig(max_new_tokens=args.max_new_tokens)
    fast = dataclasses.replace(sampling, fast_decode=True)
    ge = {
        "plain": bench_generate(
            model,
            tokenizer,
            args.plain_rows,
            dataclasses.replace(sampling, fast_decode=False, batch_size=256),
            bandwidth,
            flops,
        ),
        "optimized": bench_generate(model, tokenizer, args.fast_rows, fast, bandwidth, flops),
    }
    print(f"\n| path | tokens/s | bound | fraction | peak GiB | notes |\n|{'---|' * 6}")
    for name, r in tr.items():
        print(
            f"| train {name} | {r['tokens_per_s']:,} | {r['bound_tokens_per_s']:,} | "
            f"{r['fraction_of_bound']:.1%} | {r['peak_mem_gib']} | "
            f"micro {r['micro_batch']}x{r['accumulation']}, ckpt {r['gradient_checkpointing']}, "
            f"padding-free {r['padding_free']} |"
        )
    for name, r in ge.items():
        print(
            f"| generate {name} | {r['new_tokens_per_s']:,} | {r['bound_new_tokens_per_s']:,} | "
            f"{r['fraction_of_bound']:.1%} | {r['peak_mem_gib']} | {r['rows']} rows, batch {r['batch']}, "
            f"{r['seconds']} s incl. compile |"
        )
    print(
        f"\ntraining speed-up {tr['optimized']['tokens_per_s'] / tr['plain']['tokens_per_s']:.2f}x, "
        f"max relative loss gap per step {loss_gap:.2e}; generation speed-up "
        f"{ge['optimized']['new_tokens_per_s'] / ge['plain']['new_tokens_per_s']:.2f}x"
    )
    if args.out:
        atomic_write_json(
            args.out,
            {
                "device": device,
                "hardware": hardware(),
                "onpolicy": onpolicy,
                "train": tr,
                "train_max_relative_loss_gap": loss_gap,
                "generate": ge,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
        )


if __name__ == "__main__":
    main()
