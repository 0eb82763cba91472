"""GPU busy time as the benchmarks measure it: nvidia-smi's utilization, sampled in a thread.

``utilization.gpu`` is the percent of the last sample period in which a kernel ran on
the card; its mean over a run times the run's wall time estimates the seconds the GPU
was busy. Shared by ``scripts/bench/bench_cell_embedded.py`` (one cell) and
``scripts/bench/bench_ray_executor.py`` (the eight cells, local vs Ray).
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time


class GpuSampler(threading.Thread):
    """nvidia-smi utilization.gpu (percent of time a kernel ran) every ``period`` seconds."""

    def __init__(self, period: float = 0.5, gpu: int = 0) -> None:
        super().__init__(daemon=True)
        self.period, self.gpu, self.samples, self._halt = period, gpu, [], threading.Event()

    def run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i"]
        while not self._halt.wait(self.period):
            try:
                out = subprocess.run(
                    [*query, str(self.gpu)], capture_output=True, text=True, check=False
                ).stdout.strip()
            except FileNotFoundError:  # no NVIDIA driver here: nothing to sample
                return
            if out.isdigit():
                self.samples.append(int(out))

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return utilization_summary(self.samples)


def utilization_summary(samples: list[int]) -> dict:
    s = samples
    return {
        "samples": len(s),
        "mean_utilization": round(statistics.mean(s), 1) if s else None,
        "share_busy": round(sum(v > 0 for v in s) / len(s), 3) if s else None,
        "share_at_least_90": round(sum(v >= 90 for v in s) / len(s), 3) if s else None,
    }


def busy_seconds(summary: dict, wall_seconds: float) -> float | None:
    """Seconds with a kernel running: mean utilization x wall time (None without samples)."""
    mean = summary.get("mean_utilization")
    return None if mean is None else round(mean / 100 * wall_seconds, 1)


def run_sampled(command: list[str]) -> tuple[float, dict]:
    """Run ``command`` (check=True) while sampling GPU utilization: (wall seconds, utilization summary)."""
    sampler = GpuSampler()
    sampler.start()
    started = time.perf_counter()
    try:
        subprocess.run(command, check=True)
    finally:
        wall = time.perf_counter() - started
        gpu = sampler.stop()
    return wall, gpu
