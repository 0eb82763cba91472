"""A full-protocol #247 cell on the embedded model on a GPU: wall time, GPU busy, fast vs plain sampling.

Why: #7 asks for a whole cell in minutes, with the GPU busy through it, and for
proof that the fast decode path samples the same distribution as the plain
one. The embedded model runs the cell's real workload (600 on-policy
completions, 600 coupling examples x 20 epochs, 3,360 eval completions of up to
512 tokens) without downloading any weights.

Steps:
1. Run ``scripts/run_issue247_orchestrator.py --scale full --model smollm2-135m
   --cells <cell> --judge offline`` as a child process (a Z cell: the BS cells'
   stage 1 needs Tulu-3 from the hub) while a thread samples GPU utilization
   from nvidia-smi every 0.5 s; report wall time, per-stage times and the share
   of samples with the GPU busy.
2. Re-sample the cell's eval prompts from the same coupled adapter with the
   plain decode path (``fast_decode=False``) and compare it with the cell's own
   eval (fast path on CUDA): marker rate (two-proportion z-test), completion
   length distribution (means, quartiles, two-sample KS test), stop reasons.

Usage (on a GPU machine):
    uv run python scripts/bench/bench_cell_embedded.py --out /tmp/cell            # Z_assistant
    uv run python scripts/bench/bench_cell_embedded.py --out /tmp/cell --cell Z_villain
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from scipy.stats import ks_2samp

from explore_persona_space import generate as gen
from explore_persona_space.bench.cell import MARKER
from explore_persona_space.metrics import contains_marker
from explore_persona_space.models import EMBEDDED_ALIAS
from explore_persona_space.paths import REPO_ROOT
from explore_persona_space.personas import get_marker, persona_prompt
from explore_persona_space.results import atomic_write_json, read_raw_completions
from explore_persona_space.stats import two_proportion_test


class GpuSampler(threading.Thread):
    """nvidia-smi utilization.gpu (percent of time a kernel ran) every ``period`` seconds."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self._halt = period, [], threading.Event()

    def run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._halt.wait(self.period):
            try:
                out = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
            except FileNotFoundError:  # no NVIDIA driver here: nothing to sample
                return
            if out.isdigit():
                self.samples.append(int(out))

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        s = self.samples
        return {
            "samples": len(s),
            "mean_utilization": round(statistics.mean(s), 1) if s else None,
            "share_busy": round(sum(v > 0 for v in s) / len(s), 3) if s else None,
            "share_at_least_90": round(sum(v >= 90 for v in s) / len(s), 3) if s else None,
        }


def lengths_summary(records: list[dict]) -> dict:
    n = sorted(r["completion_tokens"] for r in records)
    q = statistics.quantiles(n, n=4)
    return {
        "mean": round(statistics.mean(n), 1),
        "quartiles": [round(x, 1) for x in q],
        "stop_share": round(sum(r["finish_reason"] == "stop" for r in records) / len(records), 3),
    }


def compare(fast: list[dict], plain: list[dict], marker: str) -> dict:
    k_fast = sum(contains_marker(r["text"], marker) for r in fast)
    k_plain = sum(contains_marker(r["text"], marker) for r in plain)
    test = two_proportion_test(k_fast, len(fast), k_plain, len(plain))
    ks = ks_2samp([r["completion_tokens"] for r in fast], [r["completion_tokens"] for r in plain])
    return {
        "marker_fast": [k_fast, len(fast)],
        "marker_plain": [k_plain, len(plain)],
        "marker_p_z": round(test.p_z, 4),
        "marker_p_fisher": round(test.p_fisher, 4),
        "length_fast": lengths_summary(fast),
        "length_plain": lengths_summary(plain),
        "length_ks_statistic": round(float(ks.statistic), 4),
        "length_ks_p": round(float(ks.pvalue), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cell", default="Z_assistant")
    ap.add_argument("--plain-batch", type=int, default=512)
    ap.add_argument("--scale", default="full", help="orchestrator scale (test: a CPU check)")
    args = ap.parse_args()
    script = REPO_ROOT / "scripts" / "run_issue247_orchestrator.py"
    command = [sys.executable, str(script), "--scale", args.scale, "--model", EMBEDDED_ALIAS]
    command += ["--cells", args.cell, "--judge", "offline", "--out", str(args.out)]
    sampler = GpuSampler()
    sampler.start()
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    gpu = sampler.stop()
    results = args.out / "eval_results" / "issue247"
    result = json.loads((results / args.cell / "run_result.json").read_text())
    stage_seconds = {s["name"]: s.get("seconds") for s in result.get("stages", [])}
    print(f"cell {args.cell}: {wall:.1f} s wall; GPU {gpu}; stages {stage_seconds}")

    fast = read_raw_completions(results / args.cell / "raw_completions.json")
    (couple,) = [s["dir"] for s in result["stages"] if s["name"] == "couple"]
    adapter = results.parent / "stages" / couple / "adapter"
    pairs = list(dict.fromkeys((r["persona"], r["question"]) for r in fast))
    prompts = [gen.Prompt(persona=p, question=q, system=persona_prompt(p)) for p, q in pairs]
    n_samples = max(r["sample"] for r in fast) + 1
    max_new = max(r["completion_tokens"] for r in fast)
    cfg = gen.SamplingConfig(
        n_samples=n_samples, max_new_tokens=max_new, fast_decode=False, batch_size=args.plain_batch
    )
    t = time.perf_counter()
    plain = gen.generate(EMBEDDED_ALIAS, prompts, cfg, adapter=adapter, backend="transformers")
    plain_seconds = time.perf_counter() - t
    check = compare(fast, plain, get_marker(MARKER))
    print(f"plain re-sample: {plain_seconds:.1f} s; fast vs plain: {json.dumps(check)}")
    atomic_write_json(
        results / "bench_cell.json",
        {
            "cell": args.cell,
            "wall_seconds": round(wall, 1),
            "gpu": gpu,
            "stages": result.get("stages"),
            "plain_resample_seconds": round(plain_seconds, 1),
            "fast_vs_plain": check,
        },
    )


if __name__ == "__main__":
    main()
