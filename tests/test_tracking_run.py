"""The #247 script at test scale with ``--wandb offline --push-to-hub``: tracked, published, re-applied.

One run of the coupled cell Z_assistant and an immediate rerun (every stage reused), into a
loopback fake Hub (tests/fake_hub.py) through the real huggingface_hub client; the offline
wandb runs are read back from disk (explore_persona_space.tracking_offline). Then the
published coupling adapter is sampled through a ``hub:`` reference, as #121's reverse arm
re-applied a published adapter, and gives the local adapter's completions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import load_script
from fake_hub import fake_hub_env, serve

from explore_persona_space import stages
from explore_persona_space.generate import SamplingConfig
from explore_persona_space.models import EMBEDDED_ALIAS
from explore_persona_space.pipeline import run_chain
from explore_persona_space.results import read_raw_completions
from explore_persona_space.tracking_offline import read_run

REPO = "org/issue247-test"
CELL = "Z_assistant"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    script = load_script("run_issue247_orchestrator")
    out = tmp_path_factory.mktemp("tracked")
    hub, server = serve()
    argv = ["--scale", "test", "--cells", CELL, "--out", str(out), "--judge", "offline"]
    argv += ["--wandb", "offline", "--push-to-hub", REPO]
    with pytest.MonkeyPatch.context() as mp:
        fake_hub_env(mp, hub.url, tmp_path_factory.mktemp("hf_cache"))
        mp.setenv("WANDB_MODE", "offline")
        assert script.main(argv) == 0
        first = json.loads((out / "eval_results" / "issue247" / CELL / "run_result.json").read_text())
        assert script.main(argv) == 0  # every stage reused
        results = out / "eval_results" / "issue247"
        runs = [read_run(d, wait=60) for d in (results / "wandb").glob("offline-run-*")]  # core may lag
        runs.sort(key=lambda r: r.started)
        yield {"script": script, "out": out, "hub": hub, "runs": runs, "first": first, "results": results}
    server.shutdown()
    server.server_close()


def _cell_runs(tracked):
    return [r for r in tracked["runs"] if r.name == CELL]


@pytest.mark.slow
def test_the_cell_run_holds_the_resolved_scale_curves_metrics_and_run_result(tracked):
    first, _ = _cell_runs(tracked)
    run_result = tracked["first"]
    assert (first.group, first.job_type, first.exit_code) == ("issue247", "Z", 0)
    assert run_result["tracking"]["wandb"]["run_id"] == first.run_id
    test_scale = json.loads(json.dumps(dataclasses.asdict(tracked["script"].TEST)))
    assert first.config["scale"] == "test" and first.config["scale_config"] == test_scale
    assert first.config["seeds"] == run_result["seeds"]
    chain = {"onpolicy", "coupling_data", "couple", "eval", "discriminator", "marker_logprob"}
    assert set(first.config["provenance"]) == chain
    assert first.config["provenance"]["couple"]["git"]["commit"] == run_result["stages"][2]["commit"]
    couple = tracked["out"] / "eval_results" / "stages" / run_result["stages"][2]["dir"]
    trained = json.loads((couple / "DONE.json").read_text())["result"]["train"]
    assert first.series("train/couple/loss") == pytest.approx(trained["losses"])  # one row per step, live
    assert first.series("train/couple/step")[: trained["steps"]] == list(range(1, trained["steps"] + 1))
    summary = run_result["results"]["summary"]
    assert first.summary["leakage/source_n"] == summary["personas"]["confab"]["n"] == 1
    assert first.summary["results/n"] == 12 and first.summary["stages/couple/reused"] is False
    assert first.summary["results/discriminator/claude/status"] == "skipped"
    (artifact,) = first.artifacts
    logged = json.loads(Path(artifact["files"]["run_result.json"]).read_text())
    assert logged["provenance"] == run_result["provenance"]  # the first run's file, not the rerun's


@pytest.mark.slow
def test_a_rerun_logs_its_reused_stages_and_no_curves(tracked):
    first, again = _cell_runs(tracked)
    assert all(again.summary[f"stages/{s}/reused"] for s in first.config["provenance"])
    assert again.summary["stages/couple/seconds"] == first.summary["stages/couple/seconds"]
    assert not any(k.startswith("train/") for row in again.history for k in row)
    assert again.summary["leakage/source_rate"] == first.summary["leakage/source_rate"]
    summaries = [r for r in tracked["runs"] if r.job_type == "summary"]
    assert len(summaries) == 2 and "figures/fig1_bystander_rate" in summaries[0].summary


@pytest.mark.slow
def test_the_push_uploads_the_cell_and_the_rerun_only_what_changed(tracked):
    hub, out = tracked["hub"], tracked["out"]
    files = hub.repos[REPO].files
    couple = next(s for s in tracked["first"]["stages"] if s["name"] == "couple")
    adapter = out / "eval_results" / "stages" / couple["dir"] / "adapter"
    folder = f"issue247/{CELL}/adapters/couple"
    assert files[f"{folder}/adapter_model.safetensors"] == (
        (adapter / "adapter_model.safetensors").read_bytes(),
        True,
    )
    assert files[f"{folder}/adapter_config.json"][0] == (adapter / "adapter_config.json").read_bytes()
    card = files[f"{folder}/README.md"][0].decode()
    assert couple["dir"] in card and f"commit `{couple['commit']}`" in card
    for name in (
        "summary.json",
        "headline.md",
        "figures/fig1_bystander_rate.png",
        f"{CELL}/raw_completions.json",
    ):
        assert f"issue247/{name}" in files
    assert hub.commits_of(REPO) == 2
    rewritten = hub.committed_paths(REPO, 1)
    assert f"issue247/{CELL}/run_result.json" in rewritten  # its provenance records this run
    assert not [p for p in rewritten if "/adapters/" in p or p.endswith("raw_completions.json")]
    receipt = json.loads((tracked["results"] / "hub_push.json").read_text())
    assert receipt["status"] == "pushed" and sorted(receipt["uploaded"]) == rewritten


@pytest.mark.slow
def test_a_published_adapter_samples_like_the_local_one(tracked, tmp_path):
    couple = next(s for s in tracked["first"]["stages"] if s["name"] == "couple")
    local = tracked["out"] / "eval_results" / "stages" / couple["dir"] / "adapter"
    sampling = SamplingConfig(n_samples=2, max_new_tokens=6, seed=7)
    texts = {}
    with pytest.MonkeyPatch.context() as mp:
        fake_hub_env(mp, tracked["hub"].url, tmp_path / "hf_cache")
        for tag, ref in (("hub", f"hub:{REPO}/issue247/{CELL}/adapters/couple"), ("local", str(local))):
            stage = stages.generate_stage(
                f"sample_{tag}", ["confab", "assistant"], "eval", sampling, base=EMBEDDED_ALIAS, adapter=ref,
                n_questions=1, backend="transformers", device="cpu",
            )  # fmt: skip
            (record,) = run_chain(tmp_path / "store", stage)
            texts[tag] = [r["text"] for r in read_raw_completions(record.dir / stages.RAW)]
            if tag == "hub":  # pinned to the commit it read
                assert record.result["model"]["adapter"] == f"{ref}@{tracked['hub'].repos[REPO].head}"
    assert texts["hub"] == texts["local"] and len(texts["hub"]) == 4 and any(texts["hub"])
