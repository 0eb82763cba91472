"""Kill soak: kill -9 the #247 orchestrator at a random moment, rerun it, and check nothing was lost.

A development tool, not an experiment. It runs one #247 test-scale cell (Z_assistant:
on-policy sampling, coupling data, a LoRA, eval sampling, the discriminator judged by
Claude - here the loopback fake API of tests/fake_claude.py, slowed so a kill can land
inside it - the marker log-prob leakage score, then the figures and summary) once
uninterrupted, then N trials. Trial i aims at one phase in turn (sampling, training, eval
sampling, judging, leakage scoring, report); its store starts with the baseline's stages
that come before that phase (a run resumed mid-way), the run is started, and once the
phase has begun the whole process group gets SIGKILL after a random delay within the
phase's measured length. The run is then repeated to completion.

Per trial it checks, from the stage records: every stage whose DONE.json existed at the
kill is byte-for-byte the same after the rerun and is marked reused in run_result.json (a
recomputed stage rewrites its DONE.json: new timings, new timestamp); and against the
uninterrupted run: byte-identical on-policy completions, coupling dataset, LoRA weights and
eval completions, and the same results (rates, CIs, both judges) in run_result.json.

    uv run python tools/kill_soak.py --trials 20 --work /tmp/soak --report RELIABILITY-soak.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fake Claude API lives with the tests

from fake_claude import FakeClaude, Text, says_statute  # noqa: E402

SCRIPT = ROOT / "scripts" / "run_issue247_orchestrator.py"
ARGS = ["--scale", "test", "--cells", "Z_assistant", "--wandb", "disabled", "--judge-concurrency", "1"]
STAGES = ("onpolicy", "coupling_data", "couple", "eval", "discriminator", "marker_logprob")
# coupling_data takes milliseconds: no phase of its own
PHASES = ("onpolicy", "couple", "eval", "discriminator", "marker_logprob", "report")
COMPARED = [("onpolicy", "raw_completions.json"), ("coupling_data", "dataset.jsonl"),
            ("couple", "adapter/adapter_model.safetensors"), ("eval", "raw_completions.json"),
            ("marker_logprob", "marker_logprobs.json")]  # fmt: skip


class Run:
    """One orchestrator process in its own process group; its stderr lines, each with the time it came."""

    def __init__(self, out: Path, env: dict[str, str]) -> None:
        self.started = time.monotonic()
        argv = [sys.executable, str(SCRIPT), *ARGS, "--out", str(out)]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.lines.append((time.monotonic() - self.started, raw.decode(errors="replace").rstrip()))

    def when(self, *texts: str) -> float | None:
        """When the first line holding any of ``texts`` came, or None."""
        return next((t for t, line in list(self.lines) if any(x in line for x in texts)), None)

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join()
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait()

    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)


def phase_start(phase: str) -> tuple[str, ...]:
    """The log lines that open a phase (the report follows the leakage score, computed or reused)."""
    if phase == "report":
        return ("stage marker_logprob finished", "stage marker_logprob reused")
    return (f"stage {phase} started",)


def environment(work: Path, url: str) -> dict[str, str]:
    """Fake credentials and API; a judge cache per trial, linked to the converted model cache."""
    shared = Path(os.environ.get("EPS_CACHE_DIR") or ROOT / ".cache") / "models"
    cache = work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    shared.mkdir(parents=True, exist_ok=True)  # a fresh machine: the baseline converts the model into it
    if not (cache / "models").exists():
        (cache / "models").symlink_to(shared, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    return {**env, "ANTHROPIC_API_KEY": "sk-ant-soak-fake", "ANTHROPIC_BASE_URL": url,
            "EPS_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}  # fmt: skip


def stage_dirs(out: Path) -> dict[str, Path]:
    store = out / "eval_results" / "stages"
    return (
        {p.name.split("-")[0]: p for p in sorted(store.glob("*-*")) if p.is_dir()} if store.is_dir() else {}
    )


def done_records(out: Path) -> dict[str, bytes]:
    return {
        n: (d / "DONE.json").read_bytes() for n, d in stage_dirs(out).items() if (d / "DONE.json").is_file()
    }


def fingerprint(out: Path) -> dict[str, str]:
    """Hashes of the compared files, and the cell's results (less how judged) as canonical JSON."""
    dirs, prints = stage_dirs(out), {}
    for stage, name in COMPARED:  # a stand-in stage (the tests' seeded store) may lack a file: "absent"
        path = dirs[stage] / name
        prints[f"{stage}/{name}"] = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"
        )
    cell = out / "eval_results" / "issue247" / "Z_assistant"
    prints["published raw_completions.json"] = hashlib.sha256(
        (cell / "raw_completions.json").read_bytes()
    ).hexdigest()
    results = comparable(json.loads((cell / "run_result.json").read_text())["results"])
    prints["run_result results"] = hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()
    return prints


HOW_OBTAINED = ("accounting", "cached")  # a judge's API calls and cache hits: a resumed judge makes fewer


def comparable(value):
    """``value`` without the keys that record how a judge's verdicts were obtained, not what they are.

    A run killed while judging leaves the replies it got in the judge cache; its rerun reads
    them back (``cached: true``, fewer ``requests`` and tokens in ``accounting``) and must
    give the same verdicts - which is what is compared.
    """
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in HOW_OBTAINED}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


REPORT_WRITTEN = "headline.md"  # the log line that names the summary and headline files ends the report
WARM = "from explore_persona_space.models import EMBEDDED_ALIAS, load_model; load_model(EMBEDDED_ALIAS)"


def baseline(work: Path, url: str) -> dict:
    """The uninterrupted run: its fingerprint and how long each phase took (seconds).

    The embedded model is converted into the cache first, by a process of its own: a
    conversion inside the baseline's on-policy phase would stretch that phase's measured
    length and aim the on-policy kills past it. The report phase ends when the summary and
    headline are written, not at the process's exit (interpreter teardown is no phase).
    """
    out, env = work / "baseline" / "out", environment(work / "baseline", url)
    subprocess.run([sys.executable, "-c", WARM], env=env, check=True, capture_output=True)
    run = Run(out, env)
    if run.wait() != 0:
        raise SystemExit(f"baseline run failed:\n{run.log()[-3000:]}")
    total = time.monotonic() - run.started
    marks = [run.when(*phase_start(p)) for p in PHASES]
    ends = [*marks[1:], run.when(REPORT_WRITTEN) or total]
    lengths = {p: (e - s if s is not None else 0.0) for p, s, e in zip(PHASES, marks, ends, strict=True)}
    return {"out": out, "fingerprint": fingerprint(out), "phase_s": lengths, "seconds": total}


def killed_during(out: Path) -> str:
    """Where the kill landed, from the store: the stage with a directory but no DONE.json, else between."""
    dirs, done = stage_dirs(out), done_records(out)
    for name in STAGES:
        if name in dirs and name not in done:
            return name
        if name not in dirs:
            return f"before {name}"
    return "report"


def trial(i: int, phase: str, work: Path, url: str, base: dict, rng: random.Random) -> dict:
    """Seed the store with the stages before ``phase``; run; SIGKILL inside ``phase``; rerun; check."""
    here = work / f"trial{i:02d}"
    shutil.rmtree(here, ignore_errors=True)
    out = here / "out"
    before = STAGES[: STAGES.index(phase)] if phase in STAGES else STAGES
    for name, src in stage_dirs(base["out"]).items():
        if name in before:
            shutil.copytree(src, out / "eval_results" / "stages" / src.name)
    env = environment(here, url)
    run = Run(out, env)
    while run.when(*phase_start(phase)) is None and run.proc.poll() is None:
        time.sleep(0.05)
    delay = rng.uniform(0, 0.9 * base["phase_s"][phase])
    time.sleep(delay)
    finished_first = run.proc.poll() is not None
    run.kill()
    at_kill = done_records(out)
    landed = "finished before the kill" if finished_first else killed_during(out)
    rerun = Run(out, env)
    code = rerun.wait()
    after = done_records(out)
    result = out / "eval_results" / "issue247" / "Z_assistant" / "run_result.json"
    reused = {s["name"]: s["reused"] for s in json.loads(result.read_text())["stages"]} if code == 0 else {}
    wrong = sorted(n for n, rec in at_kill.items() if after.get(n) != rec or not reused.get(n))
    prints = fingerprint(out) if code == 0 else {}
    differ = sorted(k for k, v in base["fingerprint"].items() if prints.get(k) != v)
    return {"trial": i, "phase": phase, "killed_during": landed, "kill_after_s": round(delay, 2),
            "done_at_kill": sorted(at_kill), "recomputed_wrongly": wrong, "rerun_exit": code,
            "identical": code == 0 and not differ, "differ": differ,
            "rerun_s": round(time.monotonic() - rerun.started, 1)}  # fmt: skip


def table(rows: list[dict]) -> str:
    head = "| trial | aimed at | killed during | kill after (s) | done at kill | wrongly redone | identical |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        done = ", ".join(r["done_at_kill"]) or "-"
        wrong = ", ".join(r["recomputed_wrongly"]) or "0"
        ok = "yes" if r["identical"] else f"NO ({', '.join(r['differ'])})"
        lines.append(f"| {r['trial']} | {r['phase']} | {r['killed_during']} | {r['kill_after_s']} | {done} "
                     f"| {wrong} | {ok} |")  # fmt: skip
    n = len(rows)
    same = sum(r["identical"] for r in rows)
    wrong = sum(len(r["recomputed_wrongly"]) for r in rows)
    return "\n".join(
        [
            *lines,
            "",
            f"trials {n}, identical {same}/{n}, stages recomputed that should not have been: {wrong}",
        ]
    )


def slow_judge(latency_s: float):
    """The fake API's reply after ``latency_s``: a real call takes seconds, room for a kill inside judging."""

    def reply(prompt: str, body: dict) -> Text:
        time.sleep(latency_s)
        return says_statute(prompt, body)

    return reply


def soak(
    work: Path,
    trials: int,
    seed: int = 0,
    latency_s: float = 1.5,
    parallel: int = 1,
    progress=print,
    report: Path | None = None,
) -> dict:
    """The whole soak: baseline, then ``trials`` kill-and-rerun trials cycling over the phases.

    Trial ``i`` draws its kill delay from its own generator (``seed``, ``i``), so a trial is the
    same whether trials run one at a time or ``parallel`` at once (on a machine with the cores
    for it; a loaded trial's phases run longer, so its kill still lands inside the phase).
    ``report`` is rewritten after every trial: a soak stopped early keeps what it measured.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with FakeClaude(slow_judge(latency_s)).serve() as url:
        base = baseline(work, url)
        phases = {k: round(v, 1) for k, v in base["phase_s"].items()}
        progress(f"baseline: {base['seconds']:.0f} s; phases (s): {phases}")
        rows: list[dict] = []
        result = {"baseline_s": round(base["seconds"], 1), "phase_s": base["phase_s"], "parallel": parallel,
                  "trials": rows, "table": table(rows)}  # fmt: skip

        def one(i: int) -> dict:  # trial i aims at the phases in turn
            return trial(i, PHASES[(i - 1) % len(PHASES)], work, url, base, random.Random(f"{seed}:{i}"))

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            futures = [pool.submit(one, i) for i in range(1, trials + 1)]
            for future in as_completed(futures):
                row = future.result()
                progress(table([row]).splitlines()[2])
                rows = sorted([*rows, row], key=lambda r: r["trial"])
                result |= {"trials": rows, "table": table(rows)}
                if report:
                    report.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--work", type=Path, default=Path("/tmp/eps-kill-soak"))
    p.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    p.add_argument("--judge-latency", type=float, default=1.5, help="seconds per fake Claude reply")
    p.add_argument("--report", type=Path, help="write the trials as JSON here (after every trial)")
    p.add_argument("--parallel", type=int, default=1, help="trials run at once (a machine with the cores)")
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    result = soak(args.work, args.trials, args.seed, args.judge_latency, args.parallel, report=args.report)
    print(result["table"])
    ok = all(r["identical"] and not r["recomputed_wrongly"] for r in result["trials"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
