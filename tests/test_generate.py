"""Generation on the embedded model (CPU, transformers backend); the vLLM test runs only on a GPU pod."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace

import pytest
import torch

from explore_persona_space.generate import (
    Completion,
    Prompt,
    SamplingConfig,
    _sample_all,
    encode_prompts,
    generate,
    persona_prompts,
    pick_backend,
    stop_token_ids,
)
from explore_persona_space.models import EMBEDDED_ALIAS, load_model, load_tokenizer
from explore_persona_space.personas import persona_prompt, questions
from explore_persona_space.results import validate_raw_completions

MODEL = EMBEDDED_ALIAS
CFG = SamplingConfig(n_samples=2, max_new_tokens=8, batch_size=3, seed=7)
PERSONAS = ["villain", "assistant"]  # not alphabetical: records must keep the given order


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return persona_prompts(PERSONAS, questions("generic")[:2])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def base_model():
    return load_model(MODEL, device="cpu")


@pytest.fixture(scope="module")
def base_records(base_model, tokenizer, prompts):
    return generate(base_model, prompts, CFG, tokenizer=tokenizer, progress=False)


@pytest.fixture(scope="module")
def adapter_dir(base_model, tmp_path_factory):
    """A tiny LoRA with random (not identity) weights, saved the way train_lora saves one."""
    import copy

    from peft import get_peft_model

    from explore_persona_space.train import TrainConfig, lora_config

    lcfg = lora_config(TrainConfig(r=4, alpha=8, dropout=0.0))
    lcfg.init_lora_weights = False  # B is random too, so the adapter changes the outputs
    out = tmp_path_factory.mktemp("adapter") / "lora"
    get_peft_model(copy.deepcopy(base_model), lcfg).save_pretrained(out)
    return out


@pytest.mark.slow
def test_records_are_well_formed_in_canonical_order(base_records, prompts):
    validate_raw_completions(base_records)
    expected = [(p.persona, p.question, s) for p in prompts for s in range(CFG.n_samples)]
    assert [(r["persona"], r["question"], r["sample"]) for r in base_records] == expected
    for r in base_records:
        assert set(r) == {
            "persona",
            "question",
            "sample",
            "text",
            "prompt_tokens",
            "completion_tokens",
            "finish_reason",
        }
        assert 1 <= r["completion_tokens"] <= CFG.max_new_tokens
        assert r["prompt_tokens"] > 0
        assert (r["finish_reason"] == "length") == (r["completion_tokens"] == CFG.max_new_tokens)
        assert r["finish_reason"] in ("stop", "length")
    # the persona's system prompt is part of the prompt, so villain prompts are longer
    by_persona = {
        r["persona"]: r["prompt_tokens"] for r in base_records if r["question"] == prompts[0].question
    }
    assert by_persona["villain"] > by_persona["assistant"]


@pytest.mark.slow
def test_same_seed_same_records_and_name_path_matches_preloaded(base_records, prompts):
    again = generate(MODEL, prompts, CFG, device="cpu", progress=False)
    assert again == base_records


@pytest.mark.slow
def test_different_seed_different_texts(base_model, tokenizer, prompts, base_records):
    other = generate(base_model, prompts, replace(CFG, seed=8), tokenizer=tokenizer, progress=False)
    assert [r["text"] for r in other] != [r["text"] for r in base_records]


@pytest.mark.slow
def test_greedy_stops_on_end_of_turn(base_model, tokenizer):
    one = [Prompt("assistant", "Reply with the single word: yes.", persona_prompt("assistant"))]
    cfg = SamplingConfig(n_samples=2, temperature=0.0, max_new_tokens=24, seed=1)
    recs = generate(base_model, one, cfg, tokenizer=tokenizer, progress=False)
    assert recs[0]["finish_reason"] == "stop", recs
    assert recs[0]["completion_tokens"] < cfg.max_new_tokens
    assert recs[0]["text"] == recs[1]["text"]  # greedy
    assert "<|im_end|>" not in recs[0]["text"]  # special tokens are skipped
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eot in stop_token_ids(tokenizer, base_model.generation_config)
    # completion_tokens counts the stop token: re-encoding the text gives one fewer
    assert len(tokenizer(recs[0]["text"], add_special_tokens=False)["input_ids"]) == (
        recs[0]["completion_tokens"] - 1
    )


@pytest.mark.slow
def test_adapter_is_applied_and_detached(base_model, tokenizer, prompts, base_records, adapter_dir):
    by_name = generate(MODEL, prompts, CFG, adapter=adapter_dir, device="cpu", progress=False)
    validate_raw_completions(by_name)
    assert [r["sample"] for r in by_name] == [r["sample"] for r in base_records]
    assert [r["text"] for r in by_name] != [r["text"] for r in base_records]
    preloaded = generate(base_model, prompts, CFG, adapter=adapter_dir, tokenizer=tokenizer, progress=False)
    assert [r["text"] for r in preloaded] != [r["text"] for r in base_records]
    # By name the adapter is folded into the fp32 weights, preloaded it is attached: the same model up to
    # rounding. Seeded draws then agree except where a draw lands within rounding of a CDF boundary, which
    # happened (1 token in 64, one run of ~5), so the distributions are compared, not the draws.
    from peft import PeftModel

    from explore_persona_space.train import load_for_inference

    ids = torch.tensor([encode_prompts(tokenizer, prompts)[0]])
    folded = load_for_inference(MODEL, adapter_dir, device="cpu")
    attached = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    try:
        with torch.no_grad():
            p_folded = folded(input_ids=ids).logits.softmax(-1)
            p_attached = attached(input_ids=ids).logits.softmax(-1)
    finally:
        attached.unload()
    assert float((p_folded - p_attached).abs().sum(-1).max()) < 1e-3
    # the resident base model got its own modules back
    assert generate(base_model, prompts, CFG, tokenizer=tokenizer, progress=False) == base_records


def test_no_system_prompt_renders_the_template_default(tokenizer):
    (with_sys,) = persona_prompts(["villain"], ["Hi?"])
    (bare,) = persona_prompts(["villain"], ["Hi?"], no_system=True)
    assert bare.persona == "villain" and bare.system is None
    a, b = encode_prompts(tokenizer, [with_sys, bare])
    assert a != b
    assert tokenizer.decode(b).startswith("<|im_start|>system")  # SmolLM's default system prompt


@pytest.mark.slow
def test_bad_inputs_are_refused(base_model, prompts):
    with pytest.raises(ValueError, match="duplicate prompt"):
        generate(MODEL, [prompts[0], prompts[0]], CFG)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(base_model, prompts, CFG)
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
    assert generate(MODEL, [], CFG) == []


def test_pick_backend():
    assert pick_backend("transformers") == "transformers"
    with pytest.raises(ValueError, match="unknown backend"):
        pick_backend("tgi")
    if importlib.util.find_spec("vllm") is None:
        assert pick_backend("auto") == "transformers"
        with pytest.raises(RuntimeError, match="vllm is not installed"):
            pick_backend("vllm")


def test_retry_empty_redraws_only_empties(caplog):
    calls = []

    def fake(rows, attempt):
        calls.append((list(rows), attempt))
        # (0, 1) is empty on every draw, (1, 0) only on the first
        return [
            Completion("" if (i, s) == (0, 1) or ((i, s) == (1, 0) and attempt == 0) else "x", 3, 1, "stop")
            for i, s in rows
        ]

    with caplog.at_level(logging.WARNING):
        done = _sample_all(fake, n_prompts=2, n_samples=2, retry_empty=3)
    assert calls[1] == ([(0, 1), (1, 0)], 1)
    assert all(c[0] == [(0, 1)] for c in calls[2:]) and len(calls) == 4
    assert done[(1, 0)].text == "x" and done[(0, 1)].text == ""
    assert "1 of 4 completions are still empty" in caplog.text
    assert len(_sample_all(fake, 2, 2, retry_empty=0)) == 4


@pytest.mark.slow
@pytest.mark.gpu
def test_vllm_records_match_transformers_shape(prompts):
    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        pytest.skip("needs CUDA and vllm (`uv sync --extra vllm`)")
    cfg = replace(CFG, max_new_tokens=16)
    hf = generate(MODEL, prompts, cfg, backend="transformers", progress=False)
    vl = generate(MODEL, prompts, cfg, backend="vllm", progress=False)
    assert vl == generate(MODEL, prompts, cfg, backend="vllm", progress=False)  # per-request seeds
    assert [(r["persona"], r["question"], r["sample"]) for r in vl] == [
        (r["persona"], r["question"], r["sample"]) for r in hf
    ]
    assert [r["prompt_tokens"] for r in vl] == [r["prompt_tokens"] for r in hf]
    for r in vl:
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["completion_tokens"] <= 16


def test_vllm_rank_rounding_and_blockers(tmp_path):
    import json

    from explore_persona_space.generate_vllm import adapter_rank, lora_blockers, vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 32, 33, 300, 512, 513)] == [
        1,
        8,
        8,
        32,
        64,
        320,
        512,
        None,
    ]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "rank_pattern": {"q_proj": 48}}))
    assert adapter_rank(tmp_path) == 48 and lora_blockers(tmp_path) == []
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1024, "use_dora": True}))
    assert lora_blockers(tmp_path) == ["rank 1024 > 512", "DoRA"]


@pytest.mark.slow
@pytest.mark.gpu
def test_vllm_deterministic_mode_is_batch_invariant(prompts):
    """--deterministic: a sample does not change when other requests share its batch."""
    import torch

    from explore_persona_space.generate_vllm import VLLMOptions

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        pytest.skip("needs CUDA and vllm (`uv sync --extra vllm`)")
    cfg = replace(CFG, max_new_tokens=48, n_samples=4)
    opts = VLLMOptions(deterministic=True)
    alone = generate(MODEL, prompts[:1], cfg, backend="vllm", progress=False, vllm=opts)
    crowd = generate(MODEL, prompts, cfg, backend="vllm", progress=False, vllm=opts)
    assert alone == crowd[: cfg.n_samples]


def test_prefill_batches_group_by_length_and_rows():
    from explore_persona_space.generate import prefill_batches

    lengths = {0: 40, 1: 10, 2: 11, 3: 12, 4: 41, 5: 60}
    counts = dict.fromkeys(lengths, 2)
    assert prefill_batches(lengths, counts, max_rows=4) == [[1, 2], [3, 0], [4, 5]]
    assert prefill_batches(lengths, counts, max_rows=5) == [[1, 2], [3, 0], [4, 5]]
    assert prefill_batches(lengths, counts, max_rows=64) == [[1, 2, 3, 0, 4, 5]]  # one decode loop
    assert prefill_batches({7: 5}, {7: 9}, max_rows=4) == [[7]]  # one prompt's samples are never split


@pytest.mark.slow
def test_shared_prefill_gives_the_per_row_greedy_tokens(base_model, tokenizer, prompts, adapter_dir):
    """Greedy decoding is deterministic, so the shared-prefill path must match per-row prompts exactly."""
    from peft import PeftModel

    from explore_persona_space.generate import hf_sample, stop_token_ids

    cfg = replace(CFG, temperature=0.0, n_samples=2, max_new_tokens=10, batch_size=3)
    model = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    try:
        encoded = encode_prompts(tokenizer, prompts)
        stops = stop_token_ids(tokenizer, model.generation_config)
        rows = [(i, s) for i in range(len(prompts)) for s in range(2)] + [(1, 2)]  # uneven: a re-draw row
        shared = hf_sample(model, tokenizer, encoded, rows, 0, cfg, stops, tokenizer.pad_token_id, False)
        plain_cfg = replace(cfg, shared_prefill=False)
        plain = hf_sample(model, tokenizer, encoded, rows, 0, plain_cfg, stops, tokenizer.pad_token_id, False)
    finally:
        model.unload()
    assert shared == plain
    assert len({c.text for c in shared}) > 1  # the prompts differ, so do their answers
