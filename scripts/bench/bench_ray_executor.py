"""The eight #247 cells on one GPU: ``--executor local`` against ``--executor ray``, cells packed on the card.

Why: #21 asks whether Ray packs small-model cells onto one GPU usefully. One full-protocol
#247 cell on the embedded model kept an H100 busy 13% of the time (BENCHMARKS.md): a 135M
model is launch-bound, so several stages at once should fill the card. The Ray executor
gives each model stage the scale's share of a GPU (``Scale.embedded_gpu_share``, 1/8) and
runs the stage DAG of all cells at once; the local executor runs them one after another.

Steps:
1. For each executor (local first, then ray) run ``scripts/run_issue247_orchestrator.py
   --scale full --model smollm2-135m --judge offline --wandb disabled --executor <x>`` as a
   child process into its own ``--out`` (``<out>/<executor>``: a fresh store, nothing
   reused), while a thread samples GPU utilization from nvidia-smi every 0.5 s. The
   embedded model is converted first, outside the timed runs. Stage 1 (benign SFT, the
   BS cells and B0) reads the shipped benign chat fixture (``--stage1``, 48 chats):
   the device reaches no hub; every stage after it is the full protocol.
2. Print per executor the wall time, GPU busy seconds (mean utilization x wall) and the
   share of samples with a kernel running; then per cell the trigger source rate and
   the mean bystander rate of both runs side by side, with a two-proportion test each
   (same seeds, but GPU kernels are not bit-reproducible across processes: the rates
   must agree within sampling noise, not exactly).
3. Write everything to ``<out>/bench_ray_executor.json``.

Usage (on a GPU machine with the ray extra, or Ray installed from a wheel):
    uv run python scripts/bench/bench_ray_executor.py --out /tmp/rayb
    uv run python scripts/bench/bench_ray_executor.py --out /tmp/rayb --cells Z_assistant Z_villain B0
    uv run python scripts/bench/bench_ray_executor.py --out /tmp/rayb --executors ray --gpu-share 0.25
    uv run python scripts/bench/bench_ray_executor.py --out /tmp/rayc --scale test   # CPU: the wiring
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from explore_persona_space.bench.gpu import busy_seconds, run_sampled
from explore_persona_space.models import EMBEDDED_ALIAS, resolve_model
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.results import atomic_write_json
from explore_persona_space.sft_data import BENIGN_CHAT_FIXTURE
from explore_persona_space.stats import two_proportion_test

SCRIPT = REPO_ROOT / "scripts" / "run_issue247_orchestrator.py"


def run_one(args: argparse.Namespace, executor: str) -> dict:
    """One orchestrator run in a child process, timed and GPU-sampled; its cells' marker counts."""
    out = args.out / executor
    command = [
        sys.executable,
        str(SCRIPT),
        "--scale",
        args.scale,
        "--model",
        EMBEDDED_ALIAS,
        "--out",
        str(out),
    ]
    command += ["--judge", "offline", "--wandb", "disabled", "--executor", executor]
    command += ["--set", f"stage1_data={args.stage1}", f"sft_n={args.sft_n}"]
    command += ["--set", f"embedded_gpu_share={args.gpu_share}"]
    if args.cells:
        command += ["--cells", *args.cells]
    print("$", " ".join(command), flush=True)
    wall, gpu = run_sampled(command)
    summary = json.loads((out / "eval_results" / "issue247" / "summary.json").read_text())
    cells = {
        name: {
            who: {"k": c[who]["k"], "n": c[who]["n"], "rate": c[who]["rate"]}
            for who in ("source", "bystander")
        }
        for name, c in summary["cells"].items()
    }
    return {
        "wall_seconds": round(wall, 1),
        "gpu": gpu,
        "gpu_busy_seconds": busy_seconds(gpu, wall),
        "cells": cells,
    }


def side_by_side(runs: dict) -> list[dict]:
    """Per cell and rate: both runs' k/n and the two-proportion test between them."""
    local, ray = runs["local"]["cells"], runs["ray"]["cells"]
    rows = []
    for cell in local:
        for who in ("source", "bystander"):
            a, b = local[cell][who], ray[cell][who]
            test = two_proportion_test(a["k"], a["n"], b["k"], b["n"])
            rows.append(
                {"cell": cell, "rate": who, "local": a, "ray": b, "p_fisher": round(test.p_fisher, 4)}
            )
    return rows


def pct(entry: dict) -> str:
    return f"{100 * entry['rate']:.1f}% ({entry['k']}/{entry['n']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cells", nargs="+", default=None, help="a subset of the eight cells (default: all)")
    ap.add_argument("--executors", nargs="+", choices=("local", "ray"), default=["local", "ray"])
    ap.add_argument("--gpu-share", type=float, default=0.125, help="a model stage's GPU share under Ray")
    ap.add_argument("--scale", default="full", help="orchestrator scale (test: a CPU check of the wiring)")
    ap.add_argument("--stage1", default=BENIGN_CHAT_FIXTURE, help="stage-1 chats (the device reaches no hub)")
    ap.add_argument("--sft-n", type=int, default=48, help="stage-1 chats read (the fixture holds 48)")
    args = ap.parse_args()
    args.out = args.out.resolve()
    resolve_model(EMBEDDED_ALIAS)  # convert the embedded model once, outside the timed runs
    runs = {executor: run_one(args, executor) for executor in args.executors}

    print("\n| executor | wall s | GPU busy s | mean GPU utilization | samples with a kernel |")
    print("|---|---|---|---|---|")
    for executor, r in runs.items():
        gpu = r["gpu"]
        print(f"| {executor} | {r['wall_seconds']} | {r['gpu_busy_seconds']} | {gpu['mean_utilization']}% "
              f"| {gpu['share_busy']} ({gpu['samples']} samples) |")  # fmt: skip
    if "local" in runs and "ray" in runs:
        speedup = runs["local"]["wall_seconds"] / runs["ray"]["wall_seconds"]
        print(f"\nspeed-up (local wall / ray wall): {speedup:.2f}x")
        rows = side_by_side(runs)
        print("\n| cell | rate | local | ray | Fisher p |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['cell']} | {r['rate']} | {pct(r['local'])} | {pct(r['ray'])} | {r['p_fisher']} |")
        runs["side_by_side"] = rows
    atomic_write_json(
        args.out / "bench_ray_executor.json", {"args": {**vars(args), "out": str(args.out)}, **runs}
    )
    print(f"\nwrote {args.out / 'bench_ray_executor.json'}")


if __name__ == "__main__":
    main()
