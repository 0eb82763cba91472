"""Same command, any PYTHONHASHSEED: byte-identical data, completions and rates; ``--seed`` changes them.
And a run with credentials in its environment writes none of them anywhere.

One #247 test-scale cell (Z_assistant: on-policy sampling, coupling data, a LoRA, eval,
the discriminator with the Claude judge on the loopback fake API of tests/fake_claude.py)
runs as a fresh process four times, each into its own store: PYTHONHASHSEED 0, 1 and
random at seed 42, and random at seed 7. Every run has fake Anthropic, Hub and wandb
credentials in its environment and tracks to wandb offline; the first run's every file
(results, stage records, figures, wandb's offline directories, the judge cache, its
stdout and stderr) is scanned for them. These runs replace the in-process seed test
that test_run_issue247.py used to hold (same runs, now across hash seeds too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, load_script
from fake_claude import FakeClaude, says_statute

from explore_persona_space.models import cache_root

SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-api03-FAKEfakeFAKE0123456789-do-not-leak",
    "HF_TOKEN": "hf_FAKEfakeFAKE0123456789donotleak",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdeffakefake",
}
SCRIPT = ROOT / "scripts" / "run_issue247_orchestrator.py"
CELL = ["--scale", "test", "--cells", "Z_assistant", "--wandb", "offline"]


@pytest.fixture(scope="module")
def claude_url():
    with FakeClaude(says_statute).serve() as url:
        yield url


def secret_env(base: Path, url: str, hashseed: str) -> dict[str, str]:
    """The test's environment plus fake credentials, the fake API, and a judge cache of this run's own.

    The cache directory links to the shared converted model, so no run converts it again,
    while each run's judge replies land in (and are scanned in) its own directory.
    """
    cache = base / "cache"
    (cache_root() / "models").mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "models").exists():
        (cache / "models").symlink_to(cache_root() / "models", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    return {
        **env,
        **SECRETS,
        "ANTHROPIC_BASE_URL": url,
        "EPS_CACHE_DIR": str(cache),
        "PYTHONHASHSEED": hashseed,
        "PYTHONUNBUFFERED": "1",
    }


def run_cell(base: Path, url: str, hashseed: str, *extra: str) -> subprocess.CompletedProcess:
    out = base / "out"
    argv = [sys.executable, str(SCRIPT), *CELL, "--out", str(out), *extra]
    done = subprocess.run(argv, env=secret_env(base, url, hashseed), capture_output=True, timeout=1800)
    (base / "stdout.txt").write_bytes(done.stdout)
    (base / "stderr.txt").write_bytes(done.stderr)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory, claude_url):
    """Four fresh runs of the one cell: {tag: directory}."""
    plan = {"h0": ("0", []), "h1": ("1", []), "hrandom": ("random", []), "seed7": ("random", ["--seed", "7"])}
    base = tmp_path_factory.mktemp("runs")
    for tag, (hashseed, extra) in plan.items():
        run_cell(base / tag, claude_url, hashseed, *extra)
    return {tag: base / tag for tag in plan}


def stage_file(run: Path, stage: str, name: str) -> bytes:
    (found,) = sorted((run / "out" / "eval_results" / "stages").glob(f"{stage}-*/{name}"))
    return found.read_bytes()


def cell_result(run: Path) -> dict:
    return json.loads(
        (run / "out" / "eval_results" / "issue247" / "Z_assistant" / "run_result.json").read_text()
    )


def first_loss(run: Path) -> float:
    return json.loads(stage_file(run, "couple", "DONE.json"))["result"]["train"]["losses"][0]


BYTES = [
    ("onpolicy", "raw_completions.json"),
    ("coupling_data", "dataset.jsonl"),
    ("eval", "raw_completions.json"),
]


@pytest.mark.slow  # four runs of a test-scale cell, each a fresh process
def test_hash_seed_changes_nothing_and_seed_changes_everything(runs):
    for stage, name in BYTES:
        h0, h1, hr, s7 = (stage_file(runs[t], stage, name) for t in ("h0", "h1", "hrandom", "seed7"))
        assert h0 == h1 == hr, f"{stage}/{name} depends on PYTHONHASHSEED"
        assert h0 != s7, f"{stage}/{name} ignores --seed"
    results = {t: cell_result(runs[t])["results"] for t in runs}
    assert results["h0"] == results["h1"] == results["hrandom"]  # rates, CIs, positions, both judges
    assert results["h0"]["discriminator"]["claude"]["status"] != "skipped"  # the fake API judged
    assert first_loss(runs["h0"]) == first_loss(runs["h1"]) == first_loss(runs["hrandom"])
    assert first_loss(runs["h0"]) != first_loss(runs["seed7"])
    keys = {t: sorted(p.name for p in (runs[t] / "out" / "eval_results" / "stages").iterdir()) for t in runs}
    assert keys["h0"] == keys["h1"] == keys["hrandom"] != keys["seed7"]
    seeds = {t: cell_result(runs[t])["seeds"] for t in runs}
    assert seeds["h0"]["eval"] == 42 and seeds["seed7"]["eval"] == 7


def files_holding_secrets(root: Path) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue  # the linked model cache is not this run's writing
        data = path.read_bytes()
        found = [k for k, v in SECRETS.items() if v.encode() in data]
        if found:
            hits[str(path.relative_to(root))] = found
    return hits


@pytest.mark.slow  # scans the runs above
def test_no_credential_reaches_any_file_the_run_wrote(runs):
    run = runs["h0"]
    written = [p for p in run.rglob("*") if p.is_file() and not p.is_symlink()]
    kinds = {p.relative_to(run).parts[0] for p in written} | {p.name for p in written}
    assert {"stdout.txt", "stderr.txt", "DONE.json", "run_result.json", "summary.json"} <= kinds
    assert any("wandb" in p.parts for p in written), "no wandb offline run to scan"
    assert any("judge" in p.parts for p in written), "no judge cache to scan"
    assert files_holding_secrets(run) == {}


def test_dry_run_and_error_messages_hold_no_credential(fake_hub, monkeypatch, tmp_path, capsys):
    run247 = load_script("run_issue247_orchestrator")
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")  # nothing is called; the Hub is the fake
    base = ["--scale", "test", "--out", str(tmp_path)]
    outputs = []
    assert run247.main([*base, "--dry-run", "--push-to-hub", "org/repo", "--wandb", "online"]) == 0
    outputs.append(capsys.readouterr())
    for bad in (["--set", "couple_lr=fast"], ["--set", "stage1_data=tests/bad_inputs/malformed.jsonl"]):
        try:
            code = run247.main([*base, "--cells", "B0", "--wandb", "disabled", *bad])
        except SystemExit as exc:
            code = exc.code
        assert code == 2
        outputs.append(capsys.readouterr())
    text = "".join(o.out + o.err for o in outputs)
    assert "distinct stage(s) to run" in text and "org/repo" in text  # the plan and the push plan
    assert [k for k, v in SECRETS.items() if v in text] == []
    assert files_holding_secrets(tmp_path) == {}
