"""Capability (multiple-choice log-prob accuracy): loading and validation, the hub path offline,
and on the embedded model a known answer, exact invariance to choice order, and the pipeline stage."""

from __future__ import annotations

import json
import random

import pytest

from explore_persona_space import capability
from explore_persona_space.capability import (
    MC_FIXTURE,
    MCFormatError,
    MCItem,
    accuracy_summary,
    capability_stage,
    read_mc_source,
    score_items,
)
from explore_persona_space.personas import persona_prompt
from explore_persona_space.pipeline import run_chain

SHA = "0123456789abcdef0123456789abcdef01234567"  # a made-up hub commit


def row(i: int, answer: str = "B", **extra) -> dict:
    base = {"id": f"q{i}", "question": f"Question {i}?", "answerKey": answer}
    base["choices"] = {"text": ["red", "green", "blue"], "label": ["A", "B", "C"]}
    return base | extra


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_shipped_fixture_loads_in_arc_schema_and_n_limits_it():
    items, record = read_mc_source(MC_FIXTURE)
    assert len(items) == 20 and record == {"source": MC_FIXTURE, "revision": None, "items": 20}
    assert all(len(it.choices) == 4 and it.answer in it.labels for it in items)
    assert len({it.answer for it in items}) == 4  # the answer is not always in one position
    first, _ = read_mc_source(MC_FIXTURE, 3)
    assert [it.id for it in first] == [it.id for it in items[:3]]
    assert items[0].answer_text == items[0].choices[items[0].labels.index(items[0].answer)]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"answerKey": "D"}, r"row 1: answerKey: 'D' is not one of the labels"),
        ({"question": "  "}, r"row 1: question: expected a non-empty string"),
        ({"choices": {"text": ["only"], "label": ["A"]}}, r"row 1: choices: need >= 2 texts"),
        ({"choices": {"text": ["a", ""], "label": ["A", "B"]}}, r"row 1: choices.text"),
        ({"choices": {"text": ["a", "b"], "label": ["A", "A"]}}, r"row 1: choices.label: duplicate"),
    ],
)
def test_a_bad_row_names_the_file_the_row_and_the_field(tmp_path, bad, message):
    path = write_rows(tmp_path / "mc.jsonl", [row(0), row(1) | bad])
    with pytest.raises(MCFormatError, match=message) as err:
        read_mc_source(str(path))
    assert str(path) in str(err.value)


def test_unknown_sources_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"expected a local \.json/\.jsonl file or an alias"):
        read_mc_source("some-owner/some-dataset")
    with pytest.raises(FileNotFoundError):
        read_mc_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="'revision' applies to hub datasets"):
        read_mc_source(MC_FIXTURE, revision="main")


def test_arc_alias_reads_the_test_split_at_the_commit_it_records(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return iter([row(0, "A"), row(1, "C")])

    monkeypatch.setattr(capability, "hub_dataset_sha", lambda hub, rev: SHA if rev is None else f"{rev}-sha")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items, record = read_mc_source(capability.ARC_CHALLENGE)
    assert calls == [
        (("allenai/ai2_arc", "ARC-Challenge"), {"split": "test", "revision": SHA, "streaming": True})
    ]
    assert record["revision"] == SHA and record["items"] == 2 and [it.answer for it in items] == ["A", "C"]
    read_mc_source(capability.ARC_CHALLENGE, 1, revision="v1")
    assert calls[-1][1]["revision"] == "v1-sha"


def test_accuracy_summary_counts_and_wilson_interval():
    rows = [{"correct": c, "correct_norm": not c} for c in (True, True, True, False)]
    s = accuracy_summary(rows)
    assert (s["k"], s["n"], s["accuracy"], s["accuracy_per_token"]) == (3, 4, 0.75, 0.25)
    assert s["wilson"][0] == pytest.approx(0.3006, abs=1e-3) and s["wilson"][1] == pytest.approx(
        0.9544, abs=1e-3
    )
    assert accuracy_summary([])["accuracy"] is None


# ----------------------------------------------------------------------------- on the embedded model
@pytest.fixture(scope="module")
def embedded():
    from explore_persona_space.models import load_model, load_tokenizer

    return load_model("smollm2-135m", device="cpu"), load_tokenizer("smollm2-135m")


def permuted(item: MCItem, seed: int) -> MCItem:
    """The same item, its choices in another order (labels stay A, B, C...; the answer follows its text)."""
    order = list(range(len(item.choices)))
    random.Random(seed).shuffle(order)
    choices = tuple(item.choices[j] for j in order)
    return MCItem(item.id, item.question, choices, item.labels, item.labels[choices.index(item.answer_text)])


@pytest.mark.slow
def test_a_choice_the_prompt_spells_out_verbatim_wins(embedded):
    model, tokenizer = embedded
    phrase = "green umbrella"
    item = MCItem(
        "verbatim",
        f"Reply with exactly these words and nothing else: {phrase}",
        ("seven tigers", phrase, "a quiet library", "frozen orange juice"),
        ("A", "B", "C", "D"),
        "B",
    )
    [scored] = score_items(model, tokenizer, [item], system=persona_prompt("assistant"), progress=False)
    assert scored["predicted"] == phrase and scored["correct"]
    lps = {c["text"]: c["logprob"] for c in scored["choices"].values()}
    assert all(lps[phrase] > lp + 5 for text, lp in lps.items() if text != phrase)  # by e^5, not by a hair
    assert scored["choices"]["B"]["tokens"] >= 2  # the words + the end-of-turn token


@pytest.mark.slow
def test_scores_are_exactly_invariant_to_choice_order(embedded):
    model, tokenizer = embedded
    items, _ = read_mc_source(MC_FIXTURE, 4)
    system = persona_prompt("assistant")
    original = score_items(model, tokenizer, items, system=system, progress=False)
    for seed in (1, 2):
        shuffled = [permuted(it, seed + k) for k, it in enumerate(items)]
        assert any(a.choices != b.choices for a, b in zip(items, shuffled, strict=True))
        again = score_items(model, tokenizer, shuffled, system=system, progress=False)
        for a, b in zip(original, again, strict=True):
            by_text = {c["text"]: c["logprob"] for c in a["choices"].values()}
            assert by_text == {c["text"]: c["logprob"] for c in b["choices"].values()}  # bit for bit
            assert (a["predicted"], a["correct"]) == (b["predicted"], b["correct"])
        assert accuracy_summary(original) == accuracy_summary(again)


@pytest.mark.slow
def test_capability_stage_scores_the_chain_model_and_keeps_the_upstream_result(tmp_path):
    stage = capability_stage("capability", source=MC_FIXTURE, base="smollm2-135m", n=2)
    [rec] = run_chain(tmp_path, stage)
    cap = rec.result["capability"]
    assert (cap["n"], cap["persona"], cap["method"]) == (2, "assistant", capability.METHOD)
    assert rec.result["model"] == {"base": "smollm2-135m", "adapter": None}
    rows = json.loads((rec.dir / capability.ITEMS_FILE).read_text())
    assert [r["id"] for r in rows] == ["mc-fixture-01", "mc-fixture-02"]
    assert cap["k"] == sum(r["correct"] for r in rows)
    [again] = run_chain(tmp_path, stage)
    assert again.reused and again.result == rec.result


@pytest.mark.slow
def test_an_adapter_is_scored_the_same_resident_or_not_and_the_resident_base_is_left_clean(
    tmp_path, monkeypatch
):
    """A non-zero LoRA (random A and B) changes the scores; attached to the resident base it scores the
    same as loaded fresh, and the resident base has no LoRA layers left afterwards."""
    import torch
    from peft import LoraConfig, get_peft_model

    from explore_persona_space import models
    from explore_persona_space.pipeline import Stage

    def make_adapter(ctx):
        model = models.load_model("smollm2-135m", device="cpu")
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        torch.manual_seed(0)  # the same random adapter in both stores
        get_peft_model(model, config).save_pretrained(ctx.dir / "adapter")
        return {"model": {"base": "smollm2-135m", "adapter": {"stage": "lora", "path": "adapter"}}}

    def run(store, resident: str) -> list[dict]:
        monkeypatch.setenv("EPS_RESIDENT", resident)
        stage = capability_stage("capability", source=MC_FIXTURE, n=2, parent=Stage("lora", make_adapter))
        *_, rec = run_chain(store, stage)
        return json.loads((rec.dir / capability.ITEMS_FILE).read_text())

    fresh, resident = run(tmp_path / "a", "0"), run(tmp_path / "b", "1")
    try:
        base = models._RESIDENT[next(iter(models._RESIDENT))]
        assert not any("lora" in name for name, _ in base.named_modules())
    finally:
        models.drop_resident()

    def flat(rows: list[dict]) -> list[float]:  # pytest.approx compares flat sequences only
        return [c["logprob"] for r in rows for c in r["choices"].values()]

    logprobs = flat(fresh)
    assert len(logprobs) == 8 and logprobs == pytest.approx(flat(resident), abs=1e-4)
    monkeypatch.setenv("EPS_RESIDENT", "0")
    plain = run_chain(
        tmp_path / "c", capability_stage("capability", source=MC_FIXTURE, base="smollm2-135m", n=2)
    )
    plain_rows = json.loads((plain[-1].dir / capability.ITEMS_FILE).read_text())
    assert flat(plain_rows) != pytest.approx(logprobs, abs=1e-3)
