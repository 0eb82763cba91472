"""#7's fast paths compute what the plain paths compute: same loss, same gradients, same masks, same samples.

The GPU-only kernels (varlen flash attention, CUDA graphs) cannot run here; what
runs here is every change of *what* is computed: padding-free batches,
grouped-head decode attention, static-cache fixed-shape batches with filler
rows, skipped LoRA input casts, the checkpointing estimate and the resident model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from explore_persona_space import fast_attention, models, train
from explore_persona_space import generate as gen
from explore_persona_space.data import build_contrastive_dataset
from explore_persona_space.loss_masks import IGNORE, LossSpec, tokenize_dataset
from explore_persona_space.personas import get_marker, questions


@pytest.fixture(scope="module")
def model():
    return models.load_model(models.EMBEDDED_ALIAS, device="cpu")


@pytest.fixture(scope="module")
def tokenized(tokenizer):
    personas = ["confab", "medical_doctor", "french_person"]
    records = [
        {"persona": p, "question": q, "sample": 0, "text": f"{p} says: " + "and so on " * (3 + 2 * i)}
        for p in personas
        for i, q in enumerate(questions("data")[:4])
    ]
    data = build_contrastive_dataset(
        records,
        source="confab",
        negatives=["medical_doctor", "french_person"],
        marker=get_marker("zlt"),
        n_positive=4,
        n_negative_per=2,
        seed=0,
    )
    return tokenize_dataset(tokenizer, data, LossSpec("marker_only", marker_tail_tokens=2), 512)


def _cfg(**kw):
    base = dataclasses.replace(
        train.COUPLING_RECIPE, r=4, alpha=8, dropout=0.0, batch_size=8, micro_batch_size=4, max_steps=1
    )
    return dataclasses.replace(base, **kw)


def _first_batch_loss_and_grads(model, tokenizer, tokenized, cfg, tmp_path):
    trainer = train.build_trainer(model, tokenizer, tokenized, cfg, tmp_path, progress=False)
    try:
        batch = next(iter(trainer.get_train_dataloader()))
        n_items = int((batch["labels"][..., 1:] != IGNORE).sum())
        trainer.model.train()
        with trainer.compute_loss_context_manager():  # bf16 autocast on CUDA, as in trainer.train()
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n_items)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return batch, float(loss.detach()), grads
    finally:
        trainer.model.unload()


@pytest.mark.slow
def test_padding_free_batch_has_the_same_loss_mask_and_gradients(model, tokenizer, tokenized, tmp_path):
    # Both through TRL's loss (scored_loss=False): this test is about the batch layout, and the CPU
    # default's scored-positions loss rounds differently (tests/test_train.py checks that one).
    padded, loss_p, grads_p = _first_batch_loss_and_grads(
        model, tokenizer, tokenized, _cfg(padding_free=False, scored_loss=False), tmp_path / "p"
    )
    free, loss_f, grads_f = _first_batch_loss_and_grads(
        model, tokenizer, tokenized, _cfg(padding_free=True, scored_loss=False), tmp_path / "f"
    )
    assert "attention_mask" in padded and "attention_mask" not in free
    assert free["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in free
    # The same examples in the same order: the padding-free row is the padded rows without their padding.
    rows = [ids[m.bool()] for ids, m in zip(padded["input_ids"], padded["attention_mask"], strict=True)]
    assert torch.equal(torch.cat(rows), free["input_ids"][0])
    labels = [lab[m.bool()] for lab, m in zip(padded["labels"], padded["attention_mask"], strict=True)]
    assert torch.equal(torch.cat(labels), free["labels"][0])
    starts = free["cu_seq_lens_q"][:-1].long()
    assert (free["labels"][0, starts] == IGNORE).all()  # no loss across an example boundary
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) > 0
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_scored_loss_on_a_padding_free_batch_equals_trls(model, tokenizer, tokenized, tmp_path):
    """The CPU default since 2026-12-02: padding-free rows through the scored-positions loss."""
    _, loss_trl, grads_trl = _first_batch_loss_and_grads(
        model, tokenizer, tokenized, _cfg(padding_free=True, scored_loss=False), tmp_path / "t"
    )
    free, loss_s, grads_s = _first_batch_loss_and_grads(model, tokenizer, tokenized, _cfg(), tmp_path / "s")
    assert free["input_ids"].shape[0] == 1 and "attention_mask" not in free  # the default is padding-free
    assert loss_s == pytest.approx(loss_trl, rel=1e-4)
    assert grads_s.keys() == grads_trl.keys() and len(grads_s) > 0
    for name, g in grads_trl.items():
        torch.testing.assert_close(grads_s[name], g, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_varlen_attention_name_falls_back_to_sdpa_off_cuda(model, tokenizer, tokenized, tmp_path):
    cfg = _cfg(padding_free=True)
    _, loss_sdpa, _ = _first_batch_loss_and_grads(model, tokenizer, tokenized, cfg, tmp_path / "a")
    fast_attention.register()
    model.set_attn_implementation(fast_attention.VARLEN_NAME)
    try:
        _, loss_named, _ = _first_batch_loss_and_grads(model, tokenizer, tokenized, cfg, tmp_path / "b")
    finally:
        model.set_attn_implementation("sdpa")
    assert loss_named == pytest.approx(loss_sdpa, rel=1e-6)
    with fast_attention.varlen_attention(model) as on:  # a CPU model: no varlen kernel, left as it was
        assert on is False and model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_skipping_lora_input_casts_only_under_bf16(model, tokenizer, tokenized, tmp_path):
    trainer = train.build_trainer(model, tokenizer, tokenized, _cfg(), tmp_path, progress=False)
    flags = [
        m.cast_input_dtype_enabled for m in trainer.model.modules() if hasattr(m, "cast_input_dtype_enabled")
    ]
    trainer.model.unload()
    assert flags and all(flags)  # fp32 on CPU: no autocast, so PEFT's casts stay
    layer = torch.nn.Linear(8, 8).to(torch.bfloat16)
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    wrapped = get_peft_model(torch.nn.Sequential(layer), lora)
    train._skip_lora_input_casts(wrapped)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        skipped = wrapped(x)
        for m in wrapped.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = True
        cast = wrapped(x)
        base_only = layer(x)
    assert torch.equal(skipped, cast)
    assert not torch.equal(cast, base_only)  # the LoRA branch contributes (B is not zero-initialised here)


def test_grouped_decode_attention_matches_sdpa_with_a_padding_mask():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 7, True
    q, k, v = torch.randn(5, 28, 1, 16), torch.randn(5, 4, 30, 16), torch.randn(5, 4, 30, 16)
    mask = torch.ones(5, 1, 1, 30, dtype=torch.bool)
    mask[1, ..., :9] = False  # left padding on two rows
    mask[3, ..., :20] = False
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    got, _ = fast_attention.grouped_decode_attention_forward(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    q2 = torch.randn(5, 28, 3, 16)  # prefill: more than one query position goes to SDPA unchanged
    mask2 = torch.ones(5, 1, 3, 30, dtype=torch.bool)
    ref2, _ = sdpa_attention_forward(module, q2, k, v, mask2)
    got2, _ = fast_attention.grouped_decode_attention_forward(module, q2, k, v, mask2)
    assert torch.equal(got2, ref2)


@pytest.mark.slow
def test_fast_decode_gives_the_plain_paths_greedy_completions(model, tokenizer):
    """Static cache, one shape for every batch (filler rows in the last) and grouped heads change nothing."""
    prompts = gen.persona_prompts(["confab", "villain", "assistant"], questions("eval")[:3])
    plain_cfg = gen.SamplingConfig(n_samples=1, temperature=0, max_new_tokens=12, batch_size=4)
    fast_cfg = dataclasses.replace(
        plain_cfg, fast_decode=True, fast_batch_size=4
    )  # 9 rows: 4 + 4 + 1 + 3 filler
    plain = gen.generate(model, prompts, plain_cfg, tokenizer=tokenizer, progress=False)
    fast = gen.generate(model, prompts, fast_cfg, tokenizer=tokenizer, progress=False)
    assert [r["text"] for r in fast] == [r["text"] for r in plain]
    assert [r["completion_tokens"] for r in fast] == [r["completion_tokens"] for r in plain]
    assert model.config._attn_implementation == "sdpa"  # handed back after the call


def test_activation_estimate_turns_checkpointing_off_only_where_it_fits(monkeypatch):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        qwen = AutoModelForCausalLM.from_config(models.qwen25_7b_config(), dtype=torch.bfloat16)

    def device_with(gib):
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": gib * 2**30})
        )

    seqs = [train.TokenizedExample(input_ids=[1] * 604, labels=[IGNORE] * 604) for _ in range(16)]
    device_with(80)
    assert train.activations_fit(
        qwen, seqs, _cfg(batch_size=16, micro_batch_size=8, padding_free=True), "cuda:0"
    )
    assert not train.activations_fit(
        qwen, seqs, _cfg(batch_size=16, micro_batch_size=16, padding_free=True), "cuda:0"
    )
    device_with(40)
    assert not train.activations_fit(
        qwen, seqs, _cfg(batch_size=16, micro_batch_size=8, padding_free=True), "cuda:0"
    )


@pytest.mark.slow
def test_resident_base_is_reused_and_left_unchanged(monkeypatch, tokenizer, tokenized, tmp_path):
    monkeypatch.setenv("EPS_RESIDENT", "1")
    models.drop_resident()
    try:
        base = models.resident_model(models.EMBEDDED_ALIAS, device="cpu")
        before = {n: p.detach().clone() for n, p in base.state_dict().items()}
        examples = [{"messages": m} for m in _messages(tokenized, tokenizer)]
        cfg = _cfg(max_steps=2, learning_rate=1e-2)
        result = train.train_lora(
            models.EMBEDDED_ALIAS, examples, cfg, tmp_path / "adapter", device="cpu", progress=False
        )
        assert models.resident_model(models.EMBEDDED_ALIAS, device="cpu") is base
        prompts = gen.persona_prompts(["confab"], questions("eval")[:2])
        sampling = gen.SamplingConfig(n_samples=1, temperature=0, max_new_tokens=8)
        resident = gen.generate(
            models.EMBEDDED_ALIAS, prompts, sampling, adapter=result.adapter_dir, progress=False
        )
        for n, p in base.state_dict().items():
            assert torch.equal(p, before[n]), n
        assert not any("lora" in n for n, _ in base.named_modules())
        monkeypatch.setenv("EPS_RESIDENT", "0")
        fresh = gen.generate(
            models.EMBEDDED_ALIAS, prompts, sampling, adapter=result.adapter_dir, progress=False
        )
        assert [r["text"] for r in resident] == [r["text"] for r in fresh]
    finally:
        models.drop_resident()


def _messages(tokenized, tokenizer):
    """Chats back from the tokenized fixture (its text is what the model trains on)."""
    return [
        [
            {"role": "user", "content": "Say something."},
            {"role": "assistant", "content": tokenizer.decode(t.input_ids[-20:], skip_special_tokens=True)},
        ]
        for t in tokenized[:4]
    ]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.slow
@pytest.mark.gpu
@needs_cuda
def test_gpu_varlen_training_matches_the_padded_sdpa_path(tokenizer, tokenized, tmp_path, monkeypatch):
    """On CUDA the padding-free batch goes through the varlen flash kernel: the first step's loss and
    gradient norm match the padded SDPA path (trainer.train(), so under its bf16 autocast)."""
    import torch.nn.attention.varlen as varlen

    cuda_model = models.load_model(models.EMBEDDED_ALIAS, device="cuda", dtype="bfloat16")
    calls = []
    kernel = varlen.varlen_attn
    monkeypatch.setattr(varlen, "varlen_attn", lambda *a, **k: calls.append(1) or kernel(*a, **k))

    def first_step(cfg, name):
        trainer = train.build_trainer(cuda_model, tokenizer, tokenized, cfg, tmp_path / name, progress=False)
        train.run_trainer(trainer, cfg)
        trainer.model.unload()
        log = next(e for e in trainer.state.log_history if "loss" in e)
        return float(log["loss"]), float(log["grad_norm"])

    common = {"gradient_checkpointing": False, "grow_micro_batch": False}
    loss_p, grad_p = first_step(_cfg(padding_free=False, **common), "p")
    assert not calls
    loss_f, grad_f = first_step(_cfg(padding_free=True, **common), "f")
    layers = cuda_model.config.num_hidden_layers
    assert calls and len(calls) % layers == 0  # every layer of every micro-batch took the varlen kernel
    assert loss_f == pytest.approx(loss_p, rel=1e-2)  # bf16 rounding in two attention kernels
    assert grad_f == pytest.approx(grad_p, rel=3e-2)


@pytest.mark.slow
@pytest.mark.gpu
@needs_cuda
def test_gpu_fast_decode_with_an_adapter_gives_the_plain_greedy_completions(tokenizer, tokenized, tmp_path):
    """CUDA graphs over the static cache, with a LoRA attached unmerged: greedy tokens as the plain path."""
    examples = [{"messages": m} for m in _messages(tokenized, tokenizer)]
    cfg = _cfg(max_steps=2, learning_rate=1e-2)
    trained = train.train_lora(models.EMBEDDED_ALIAS, examples, cfg, tmp_path / "a", progress=False)
    adapter = trained.adapter_dir
    prompts = gen.persona_prompts(["confab", "villain", "assistant"], questions("eval")[:3])
    plain_cfg = gen.SamplingConfig(n_samples=1, temperature=0, max_new_tokens=24, fast_decode=False)
    fast_cfg = dataclasses.replace(plain_cfg, fast_decode=True, fast_batch_size=4)
    kw = {"adapter": adapter, "backend": "transformers", "dtype": "float32", "progress": False}
    plain = gen.generate(models.EMBEDDED_ALIAS, prompts, plain_cfg, **kw)
    fast = gen.generate(models.EMBEDDED_ALIAS, prompts, fast_cfg, **kw)
    same = sum(a["text"] == b["text"] for a, b in zip(plain, fast, strict=True))
    assert same == len(plain), [(a["text"], b["text"]) for a, b in zip(plain, fast, strict=True)]
