"""A full-protocol #247 cell on the embedded model on a GPU: wall time, GPU busy, one backend against another.

Why: #7 asks for a whole cell in minutes, with the GPU busy through it, and for
proof that the fast decode path samples the same distribution as the plain
one; #14 asks for the same proof for the vLLM backend, started in the process
that has just trained the cell's LoRA. The embedded model runs the cell's real
workload (600 on-policy completions, 600 coupling examples x 20 epochs, 3,360
eval completions of up to 512 tokens) without downloading any weights.

Steps:
1. Run ``scripts/run_issue247_orchestrator.py --scale full --model smollm2-135m
   --cells <cell> --judge offline --backend <backend>`` as a child process (a Z
   cell: the BS cells' stage 1 needs Tulu-3 from the hub) while a thread samples
   GPU utilization from nvidia-smi every 0.5 s; report wall time, per-stage
   times, eval throughput and the share of samples with the GPU busy.
2. Re-sample the cell's eval prompts from the same coupled adapter with a
   reference path and compare it with the cell's own eval: marker rate
   (two-proportion z-test), completion length distribution (means, quartiles,
   two-sample KS test), stop reasons. The reference is the plain transformers
   decode (``fast_decode=False``) for a transformers cell (its eval used the
   fast path on CUDA), and the transformers backend's CUDA default (fast
   decode) for a vLLM cell.

A rerun with the same ``--out`` reuses the cell's finished stages and only
re-does step 2 (``--reference-only`` says so explicitly and skips the child).

Usage (on a GPU machine):
    uv run python scripts/bench/bench_cell_embedded.py --out /tmp/cell            # Z_assistant
    uv run python scripts/bench/bench_cell_embedded.py --out /tmp/cell --cell Z_villain
    uv run python scripts/bench/bench_cell_embedded.py --out /tmp/vcell --backend vllm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from scipy.stats import ks_2samp

from explore_persona_space import generate as gen
from explore_persona_space.bench.cell import MARKER
from explore_persona_space.bench.gpu import run_sampled
from explore_persona_space.metrics import contains_marker
from explore_persona_space.models import EMBEDDED_ALIAS
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.personas import get_marker, persona_prompt
from explore_persona_space.results import atomic_write_json, read_raw_completions
from explore_persona_space.stats import two_proportion_test


def lengths_summary(records: list[dict]) -> dict:
    n = sorted(r["completion_tokens"] for r in records)
    q = statistics.quantiles(n, n=4)
    return {
        "mean": round(statistics.mean(n), 1),
        "quartiles": [round(x, 1) for x in q],
        "stop_share": round(sum(r["finish_reason"] == "stop" for r in records) / len(records), 3),
    }


def compare(cell: list[dict], reference: list[dict], marker: str) -> dict:
    k_cell = sum(contains_marker(r["text"], marker) for r in cell)
    k_ref = sum(contains_marker(r["text"], marker) for r in reference)
    test = two_proportion_test(k_cell, len(cell), k_ref, len(reference))
    ks = ks_2samp([r["completion_tokens"] for r in cell], [r["completion_tokens"] for r in reference])
    return {
        "marker_cell": [k_cell, len(cell)],
        "marker_reference": [k_ref, len(reference)],
        "marker_p_z": round(test.p_z, 4),
        "marker_p_fisher": round(test.p_fisher, 4),
        "length_cell": lengths_summary(cell),
        "length_reference": lengths_summary(reference),
        "length_ks_statistic": round(float(ks.statistic), 4),
        "length_ks_p": round(float(ks.pvalue), 4),
    }


def stage_result(store: Path, entry: dict) -> dict:
    return json.loads((store / entry["dir"] / "DONE.json").read_text()).get("result", {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cell", default="Z_assistant")
    ap.add_argument("--backend", choices=gen.BACKENDS, default="transformers", help="the cell's backend")
    ap.add_argument("--plain-batch", type=int, default=512)
    ap.add_argument("--scale", default="full", help="orchestrator scale (test: a CPU check)")
    ap.add_argument("--reference-only", action="store_true", help="the cell has run: only step 2")
    args = ap.parse_args()
    script = REPO_ROOT / "scripts" / "run_issue247_orchestrator.py"
    command = [sys.executable, str(script), "--scale", args.scale, "--model", EMBEDDED_ALIAS]
    command += ["--cells", args.cell, "--judge", "offline", "--out", str(args.out), "--backend", args.backend]
    wall, gpu = None, None
    if not args.reference_only:
        wall, gpu = run_sampled(command)
    results = args.out / "eval_results" / "issue247"
    store = results.parent / "stages"
    result = json.loads((results / args.cell / "run_result.json").read_text())
    stage_seconds = {s["name"]: s.get("seconds") for s in result.get("stages", [])}
    (eval_entry,) = [s for s in result["stages"] if s["name"] == "eval"]
    eval_tokens = stage_result(store, eval_entry)["new_tokens"]
    eval_rate = eval_tokens / eval_entry["seconds"] if eval_entry.get("seconds") else None
    print(f"cell {args.cell} ({args.backend}): {wall} s wall; GPU {gpu}; stages {stage_seconds}")
    if eval_rate:
        print(f"cell eval: {eval_tokens:,} new tokens in {eval_entry['seconds']:.1f} s = {eval_rate:,.0f}/s")

    cell = read_raw_completions(results / args.cell / "raw_completions.json")
    (couple,) = [s["dir"] for s in result["stages"] if s["name"] == "couple"]
    adapter = store / couple / "adapter"
    pairs = list(dict.fromkeys((r["persona"], r["question"]) for r in cell))
    prompts = [gen.Prompt(persona=p, question=q, system=persona_prompt(p)) for p, q in pairs]
    n_samples = max(r["sample"] for r in cell) + 1
    max_new = max(r["completion_tokens"] for r in cell)
    plain = args.backend != "vllm"  # a vLLM cell is compared with the transformers default path
    reference_name = "transformers, plain decode" if plain else "transformers, CUDA default (fast decode)"
    cfg = gen.SamplingConfig(
        n_samples=n_samples, max_new_tokens=max_new, fast_decode=False if plain else None,
        batch_size=args.plain_batch,
    )  # fmt: skip
    t = time.perf_counter()
    reference = gen.generate(EMBEDDED_ALIAS, prompts, cfg, adapter=adapter, backend="transformers")
    ref_seconds = time.perf_counter() - t
    ref_tokens = sum(r["completion_tokens"] for r in reference)
    check = compare(cell, reference, get_marker(MARKER))
    print(
        f"reference re-sample ({reference_name}): {ref_tokens:,} new tokens in {ref_seconds:.1f} s "
        f"= {ref_tokens / ref_seconds:,.0f}/s; cell vs reference: {json.dumps(check)}"
    )
    atomic_write_json(
        results / f"bench_cell_{args.backend}.json",
        {
            "cell": args.cell,
            "backend": args.backend,
            "wall_seconds": round(wall, 1) if wall is not None else None,
            "gpu": gpu,
            "stages": result.get("stages"),
            "eval_new_tokens": eval_tokens,
            "reference": reference_name,
            "reference_seconds": round(ref_seconds, 1),
            "reference_new_tokens": ref_tokens,
            "cell_vs_reference": check,
        },
    )


if __name__ == "__main__":
    main()
