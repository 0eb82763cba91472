"""CPU rates of the embedded model through the package's own paths: what smoke scales can afford.

Why: every orchestrator's smoke scale must finish in minutes on a 2-core CPU.
This measures the two costs that dominate it - LoRA training tokens/s (coupling
recipe, marker-only loss) and sampling new-tokens/s - on the embedded model,
so smoke sizes are chosen from numbers rather than guesses.

Steps: sample on-policy completions for the #247 trigger and negative personas
(timed: generation rate), build coupling data from them, train a LoRA for a
fixed number of optimizer steps (timed: training rate).

Usage:
    uv run python scripts/bench/bench_cpu_embedded.py
    uv run python scripts/bench/bench_cpu_embedded.py --questions 8 --samples 2 --max-new-tokens 64 --steps 6
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from explore_persona_space import models, train
from explore_persona_space.bench.cell import MARKER, NEGATIVES, TRIGGER
from explore_persona_space.data import build_contrastive_dataset
from explore_persona_space.generate import SamplingConfig, generate, persona_prompts
from explore_persona_space.personas import get_marker, questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=8, help="data questions per persona")
    ap.add_argument("--samples", type=int, default=2, help="completions per persona x question")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="generation rows per batch")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps to time")
    ap.add_argument("--micro-batch", type=int, default=4)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, device: {models.pick_device()}")

    prompts = persona_prompts([TRIGGER, *NEGATIVES], questions("data")[: args.questions])
    cfg = SamplingConfig(n_samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    generate(
        models.EMBEDDED_ALIAS,
        prompts[:1],
        dataclasses.replace(cfg, n_samples=1, max_new_tokens=4),
        progress=False,
    )  # load and warm up outside the timer
    started = time.perf_counter()
    records = generate(models.EMBEDDED_ALIAS, prompts, cfg, retry_empty=2, progress=False)
    gen_s = time.perf_counter() - started
    new = sum(r["completion_tokens"] for r in records)
    print(
        f"generate: {len(records)} completions, {new} new tokens in {gen_s:.1f} s "
        f"= {new / gen_s:.0f} new tok/s, {len(records) / gen_s:.2f} completions/s (incl. model load)"
    )

    per_persona = args.questions * args.samples
    kept = [r for r in records if r["text"].strip()]
    data = build_contrastive_dataset(
        kept,
        source=TRIGGER,
        negatives=NEGATIVES,
        marker=get_marker(MARKER),
        n_positive=per_persona,
        n_negative_per=per_persona,
        seed=42,
    )
    tcfg = dataclasses.replace(
        train.COUPLING_RECIPE,
        max_steps=args.steps,
        batch_size=args.micro_batch,
        micro_batch_size=args.micro_batch,
        learning_rate=3e-4,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = train.train_lora(models.EMBEDDED_ALIAS, data, tcfg, Path(tmp) / "adapter", progress=False)
    mean_len = result.n_tokens / result.n_examples
    seen = mean_len * result.steps * args.micro_batch
    print(
        f"train: {result.steps} steps x {args.micro_batch} sequences (mean {mean_len:.0f} tokens) in "
        f"{result.seconds:.1f} s = {seen / result.seconds:.0f} tok/s (incl. model load and setup)"
    )


if __name__ == "__main__":
    main()
