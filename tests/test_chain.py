"""The whole chain on the embedded model: stage-1 SFT -> merge -> on-policy data -> coupling -> eval."""

import dataclasses
import json

import pytest

from explore_persona_space import stages
from explore_persona_space.analyze import analyze
from explore_persona_space.generate import SamplingConfig
from explore_persona_space.personas import get_marker, questions
from explore_persona_space.pipeline import Cell, run_cells
from explore_persona_space.results import read_raw_completions
from explore_persona_space.train import COUPLING_RECIPE, STAGE1_SFT_RECIPE

# The whole module trains and samples the embedded model.
pytestmark = pytest.mark.slow

TINY = {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "r": 4, "alpha": 8, "warmup_ratio": 0.0}


def test_sft_merge_couple_eval_chain_runs_and_resumes(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Sure."}]}
            )
            + "\n"
            for q in questions("data")[:4]
        )
    )
    sft = stages.train_stage(
        "sft",
        dataclasses.replace(STAGE1_SFT_RECIPE, **TINY),
        {"kind": "chat_jsonl", "path": str(chats)},
        base="smollm2-135m",
    )
    merged = stages.merge_stage("merge", parent=sft)
    data_cfg = SamplingConfig(n_samples=2, max_new_tokens=12, seed=1)
    onpolicy = stages.generate_stage(
        "onpolicy",
        ["confab", "medical_doctor"],
        "data",
        data_cfg,
        parent=merged,
        n_questions=3,
        retry_empty=2,
    )
    dataset = stages.coupling_data_stage(
        "dataset",
        parent=onpolicy,
        source="confab",
        negatives=["medical_doctor"],
        marker="zlt",
        n_positive=4,
        n_negative_per=4,
        seed=42,
    )
    couple = stages.train_stage(
        "couple",
        dataclasses.replace(COUPLING_RECIPE, learning_rate=1e-3, **TINY),
        {"kind": "upstream", "stage": "dataset"},
        parent=dataset,
    )
    eval_cfg = SamplingConfig(n_samples=2, max_new_tokens=12, seed=2)
    score = {"marker": "zlt", "source": "confab", "mode": "strict"}
    final = stages.generate_stage(
        "eval", ["confab", "medical_doctor"], "eval", eval_cfg, parent=couple, n_questions=2, score=score
    )
    cell = Cell("chain", final, publish=(stages.RAW,))

    records = run_cells(tmp_path / "work", [cell], out=tmp_path / "out", progress=False)["chain"]
    assert [r.name for r in records] == ["sft", "merge", "onpolicy", "dataset", "couple", "eval"]
    assert not any(r.reused for r in records)
    couple_rec = records[4]
    assert couple_rec.result["model"]["base"] == {"stage": "merge", "path": "model"}
    assert (couple_rec.dir / "adapter" / "adapter_config.json").is_file()

    run_result = json.loads((tmp_path / "out" / "chain" / "run_result.json").read_text())
    raw = read_raw_completions(tmp_path / "out" / "chain" / stages.RAW)
    assert len(raw) == 2 * 2 * 2
    summary = run_result["results"]["summary"]
    assert summary == json.loads(json.dumps(analyze(raw, get_marker("zlt"), source="confab")))
    assert set(run_result["timings_s"]) == {"sft", "merge", "onpolicy", "dataset", "couple", "eval"}

    again = run_cells(tmp_path / "work", [cell], out=tmp_path / "out", progress=False)["chain"]
    assert all(r.reused for r in again)
    assert again[-1].result == records[-1].result
