"""Publishing to the Hub with the real huggingface_hub client against a loopback fake Hub (tests/fake_hub.py).

The experiment on disk is hand-made (no model): a coupling stage with a LoRA adapter in
safetensors, its upstream dataset, an eval stage, one cell's run_result.json and raw
completions, summary.json, headline.md and a figure - the shapes a script leaves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from explore_persona_space import hub, orchestrate
from explore_persona_space.pipeline import Cell, Stage

REPO = "org/exp-results"
COMMIT = "c0ffee" + "0" * 34


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def make_experiment(root: Path, seed: int = 0) -> dict[str, Path]:
    """eval_results/{stages,exp}/ and figures/exp/ as a one-cell run would leave them."""
    store, figures = root / "eval_results", root / "figures" / "exp"
    results = store / "exp"
    stages = store / "stages"
    (stages / "coupling_data-aaaa").mkdir(parents=True)
    (stages / "coupling_data-aaaa" / "dataset.jsonl").write_text('{"messages": []}\n')
    adapter = stages / "couple-bbbb" / "adapter"
    adapter.mkdir(parents=True)
    weights = np.random.default_rng(seed).standard_normal((8, 4)).astype(np.float32)
    save_file(
        {"base_model.model.layers.0.q_proj.lora_A.weight": weights},
        str(adapter / "adapter_model.safetensors"),
    )
    _json(adapter / "adapter_config.json", {"r": 4, "lora_alpha": 8, "peft_type": "LORA"})
    (adapter / "tokenizer.json").write_text("{}")  # in the adapter dir, not an adapter file: not uploaded
    config = {
        "base": "smollm2-135m",
        "train": {"r": 4, "learning_rate": 7e-4},
        "data": {"kind": "upstream", "stage": "coupling_data"},
        "key": {"induction": "assistant"},
    }
    _json(stages / "couple-bbbb" / "config.json", {"name": "couple", "key": "bbbb", "config": config})
    train = {"steps": 2, "n_examples": 4, "n_tokens": 100, "n_loss_tokens": 20, "losses": [5.25, 4.5]}
    prov = {
        "git": {"commit": COMMIT, "dirty": False},
        "packages": {"peft": "0.x"},
        "device": "cpu",
        "device_name": "x86_64",
        "dtype": "float32",
        "created_utc": "2026-12-01T00:00:00+00:00",
    }
    model = {"base": "smollm2-135m", "adapter": {"stage": "couple", "path": "adapter"}}
    _json(
        stages / "couple-bbbb" / "DONE.json",
        {"result": {"model": model, "train": train}, "seconds": 1, "provenance": prov},
    )
    _json(stages / "eval-cccc" / "DONE.json", {"result": {"n": 8}, "seconds": 1, "provenance": prov})
    personas = {
        "confab": {"k": 1, "n": 4, "rate": 0.25, "wald": [0.0, 0.67]},
        "assistant": {"k": 0, "n": 4, "rate": 0.0, "wald": [0.0, 0.0]},
    }
    summary = {"source": "confab", "personas": personas, "bystander_mean": 0.0}
    entries = [
        {"name": n, "dir": d}
        for n, d in (
            ("coupling_data", "coupling_data-aaaa"),
            ("couple", "couple-bbbb"),
            ("eval", "eval-cccc"),
        )
    ]
    _json(results / "Z_a" / "run_result.json", {"results": {"summary": summary, "n": 8}, "stages": entries})
    _json(results / "Z_a" / "raw_completions.json", [])
    (results / "Z_a" / ".tmp-raw_completions.json").write_text("debris")  # never uploaded
    _json(results / "summary.json", {"experiment": "exp", "wall_seconds": 1.0})
    (results / "headline.md").write_text("# exp\n")
    figures.mkdir(parents=True)
    (figures / "fig1.png").write_bytes(b"\x89PNG fake")
    (figures / "fig1.pdf").write_bytes(b"%PDF fake")
    return {"store": store, "results": results, "figures": figures, "adapter": adapter}


EXPECTED = {
    "exp/summary.json",
    "exp/headline.md",
    "exp/figures/fig1.png",
    "exp/figures/fig1.pdf",
    "exp/Z_a/raw_completions.json",
    "exp/Z_a/run_result.json",
    "exp/Z_a/adapters/couple/adapter_model.safetensors",
    "exp/Z_a/adapters/couple/adapter_config.json",
    "exp/Z_a/adapters/couple/README.md",
}


def _plan(exp):
    return hub.plan(REPO, "exp", exp["results"], exp["figures"], exp["store"])


def _publish(exp):
    return hub.publish(REPO, "exp", exp["results"], exp["figures"], exp["store"])


def test_first_push_plans_every_file_new_and_uploads_it_with_the_real_client(fake_hub, tmp_path):
    exp = make_experiment(tmp_path)
    plan = _plan(exp)
    assert {u.path for u in plan.uploads} == EXPECTED
    assert {u.status for u in plan.uploads} == {"new"} and plan.remote_note is None

    receipt = _publish(exp)
    assert receipt["status"] == "pushed" and set(receipt["uploaded"]) == EXPECTED
    assert json.loads((exp["results"] / hub.RECEIPT).read_text()) == receipt
    repo = fake_hub.repos[REPO]
    assert repo.private and receipt["commit"] == repo.head
    for rel in ("adapter_model.safetensors", "adapter_config.json"):
        content, is_lfs = repo.files[f"exp/Z_a/adapters/couple/{rel}"]
        assert content == (exp["adapter"] / rel).read_bytes()
        assert is_lfs == rel.endswith(".safetensors")  # the weights went through LFS: batch, then PUT
    assert repo.files["exp/figures/fig1.png"][0] == b"\x89PNG fake"
    lfs_put = ("PUT", f"/lfs-upload/{hashlib.sha256(old_weights(exp)).hexdigest()}")
    assert fake_hub.calls == [
        ("GET", f"/api/models/{REPO}/tree/main/exp"),  # the test's plan: 404, no such repo yet
        ("GET", f"/api/models/{REPO}/tree/main/exp"),  # publish plans again, then pushes
        ("POST", "/api/repos/create"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/{REPO}.git/info/lfs/objects/batch"),
        lfs_put,
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]


def old_weights(exp) -> bytes:
    return (exp["adapter"] / "adapter_model.safetensors").read_bytes()


def test_model_card_holds_the_stage_provenance_data_hash_and_cell_metrics(fake_hub, tmp_path):
    from huggingface_hub import ModelCard

    exp = make_experiment(tmp_path)
    _publish(exp)
    text = fake_hub.repos[REPO].files["exp/Z_a/adapters/couple/README.md"][0].decode()
    card = ModelCard(text)
    assert card.data.library_name == "peft" and "exp" in card.data.tags
    assert card.data.base_model is None  # the embedded model has no hub id to claim
    dataset_sha = hashlib.sha256(b'{"messages": []}\n').hexdigest()
    needles = [
        f"commit `{COMMIT}` (dirty: False)",
        "`couple-bbbb`",
        f"dataset.jsonl` sha256 `{dataset_sha}`",
        "source marker rate 0.250 (1/4), 95% Wald CI [0.000, 0.670]",
        "loss 5.2500 -> 4.5000",
        '"learning_rate": 0.0007',
        "hub:<this repo>/exp/Z_a/adapters/couple",
    ]
    for needle in needles:
        assert needle in text, needle


def test_a_rerun_uploads_only_what_changed(fake_hub, tmp_path):
    exp = make_experiment(tmp_path)
    _publish(exp)
    again = _publish(exp)
    assert again["status"] == "unchanged" and fake_hub.commits_of(REPO) == 1
    assert {u.status for u in _plan(exp).uploads} == {"unchanged"}

    _json(exp["results"] / "summary.json", {"experiment": "exp", "wall_seconds": 2.0})
    plan = _plan(exp)
    assert [(u.path, u.status) for u in plan.to_upload] == [("exp/summary.json", "changed")]
    listing = hub.plan_text(plan)
    assert listing.startswith(f"# push to {REPO}: 1 of 9 file(s) to upload")
    assert "changed   " in listing and listing.count("unchanged ") == 8

    receipt = _publish(exp)
    assert receipt["uploaded"] == ["exp/summary.json"]
    assert fake_hub.committed_paths(REPO, 1) == ["exp/summary.json"]
    assert sum(m == "PUT" for m, _ in fake_hub.calls) == 1  # the weights were not sent again


def test_no_token_is_a_recorded_skip_not_a_crash(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    exp = make_experiment(tmp_path)
    receipt = _publish(exp)
    assert receipt["status"] == "skipped: no credentials"
    assert json.loads((exp["results"] / hub.RECEIPT).read_text())["status"] == "skipped: no credentials"
    assert fake_hub.commits_of(REPO) == 0


def test_hub_references_pin_the_commit_and_fetch_the_adapter(fake_hub, tmp_path):
    exp = make_experiment(tmp_path)
    first = _publish(exp)["commit"]
    ref = f"hub:{REPO}/exp/Z_a/adapters/couple"
    assert hub.parse_ref(ref) == hub.HubRef(REPO, "exp/Z_a/adapters/couple")
    assert hub.parse_ref(ref + "@v1.0") == hub.HubRef(REPO, "exp/Z_a/adapters/couple", "v1.0")
    pinned = hub.pin(ref)
    assert pinned == f"{ref}@{first}" and hub.pin(pinned) == pinned
    old = (exp["adapter"] / "adapter_model.safetensors").read_bytes()
    assert (hub.fetch_adapter(pinned) / "adapter_model.safetensors").read_bytes() == old

    make_experiment(tmp_path / "retrained", seed=1)["adapter"]  # new weights, same paths
    exp2 = {k: Path(str(v).replace(str(tmp_path), str(tmp_path / "retrained"))) for k, v in exp.items()}
    _publish(exp2)
    assert (hub.fetch_adapter(pinned) / "adapter_model.safetensors").read_bytes() == old  # the pin holds
    new = (exp2["adapter"] / "adapter_model.safetensors").read_bytes()
    assert new != old and (hub.fetch_adapter(ref) / "adapter_model.safetensors").read_bytes() == new
    for bad in ("hub:onlyorg", "org/repo/x", "hub:/x"):
        with pytest.raises(ValueError):
            hub.parse_ref(bad)


def test_dry_run_lists_the_upload_and_the_cells_the_run_rewrites(fake_hub, tmp_path, capsys):
    exp = make_experiment(tmp_path)
    _publish(exp)
    _json(exp["results"] / "Z_a" / "raw_completions.json", [{"changed": True}])
    paths = orchestrate.ExperimentPaths("exp", tmp_path, hub_repo=REPO)
    train = Stage("couple", lambda ctx: {}, {"train": {"r": 4}})
    cells = [Cell("Z_a", Stage("eval", lambda ctx: {}, {}, parent=train))]
    text = orchestrate.plan_text(paths, cells)
    assert f"# push to {REPO}: 1 of 9 file(s) to upload" in text
    assert "changed" in next(
        line for line in text.splitlines() if line.endswith("exp/Z_a/raw_completions.json")
    )
    assert "exp/Z_a/ (run_result.json, adapters/couple; hashed after the run)" in text
    assert fake_hub.commits_of(REPO) == 1  # planning uploads nothing

    assert hub.main([str(exp["results"]), REPO, "--dry-run"]) == 0
    assert "1 of 9 file(s) to upload" in capsys.readouterr().out


def test_push_flag_and_its_environment_variable(monkeypatch, tmp_path):
    scales = {"test": object()}
    parse = orchestrate.parser(None, ["A"], tuple(scales)).parse_args
    assert parse([]).push_to_hub is None
    with pytest.raises(SystemExit) as exit_info:
        parse(["--push-to-hub", "not-a-repo"])
    assert exit_info.value.code == 2
    monkeypatch.setenv(hub.ENV_REPO, REPO)
    args = orchestrate.parser(None, ["A"], tuple(scales)).parse_args(["--out", str(tmp_path)])
    assert args.push_to_hub == REPO
    args.tracker = None
    assert orchestrate.experiment_paths("exp", args).hub_repo == REPO


def test_an_unreadable_cell_is_a_recorded_failed_push_not_a_crash(fake_hub, tmp_path):
    exp = make_experiment(tmp_path)
    (exp["results"] / "Z_a" / "run_result.json").write_text("{not json")
    receipt = _publish(exp)
    assert receipt["status"].startswith("failed: InputError")
    assert "Z_a/run_result.json:1: not valid JSON" in receipt["status"]  # the file and line, for a person
    assert json.loads((exp["results"] / hub.RECEIPT).read_text()) == receipt
    assert fake_hub.commits_of(REPO) == 0
