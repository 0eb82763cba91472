"""A tiny real coupling run on the embedded model: the marker's loss must drop; merge must agree."""

import dataclasses

import pytest

from explore_persona_space import train
from explore_persona_space.data import build_contrastive_dataset
from explore_persona_space.loss_masks import LossSpec, tokenize_dataset
from explore_persona_space.models import load_model
from explore_persona_space.personas import get_marker, questions


def test_recipes_carry_the_protocol_numbers():
    c, s, t = train.COUPLING_RECIPE, train.STAGE1_SFT_RECIPE, train.TWO_MARKER_RECIPE
    assert (c.r, c.alpha, c.learning_rate, c.epochs, c.batch_size, c.max_length) == (
        32,
        64,
        5e-6,
        20,
        16,
        2048,
    )
    assert c.loss == LossSpec("marker_only", eos_in_loss=True, marker_tail_tokens=0)
    assert (s.learning_rate, s.epochs, s.weight_decay, s.loss.mode) == (1e-4, 1, 0.01, "assistant_only")
    assert (t.r, t.alpha, t.learning_rate, t.epochs, t.scheduler, t.max_length) == (
        16,
        32,
        1e-5,
        3,
        "cosine",
        1024,
    )
    assert t.loss.mode == "full_token" and c.accumulation == 4
    with pytest.raises(ValueError, match="multiple"):
        dataclasses.replace(c, batch_size=10, micro_batch_size=4)


@pytest.mark.slow
def test_tiny_coupling_run_lowers_marker_loss_and_merge_matches_adapter(tokenizer, tiny_coupling):
    data, cfg, result, work = tiny_coupling.data, tiny_coupling.cfg, tiny_coupling.result, tiny_coupling.dir
    positives = [
        t
        for t, ex in zip(tokenize_dataset(tokenizer, data, cfg.loss), data, strict=True)
        if ex.role == "positive"
    ]
    before = train.masked_loss(load_model("smollm2-135m", dtype="float32"), positives, tokenizer.pad_token_id)

    assert result.steps == 5 and len(result.losses) == 5
    assert (work / "adapter" / "adapter_config.json").is_file()
    assert not list(work.glob(".tmp-*"))
    # fp32 everywhere: a bf16 merge rounds much of a small LoRA delta away (seen on an H100)
    adapted = train.load_with_adapter("smollm2-135m", result.adapter_dir, dtype="float32")
    after = train.masked_loss(adapted, positives, tokenizer.pad_token_id)
    assert after < 0.5 * before, (before, after)

    merged = train.merge_adapter("smollm2-135m", result.adapter_dir, work / "merged", dtype="float32")
    reloaded = load_model(str(merged), dtype="float32")
    merged_loss = train.masked_loss(reloaded, positives, tokenizer.pad_token_id)
    assert merged_loss == pytest.approx(after, rel=1e-3)


@pytest.mark.slow
def test_fold_lora_gives_peft_merge_weights_and_declines_what_it_cannot_fold(tiny_coupling, tmp_path):
    import json
    import shutil

    import torch

    adapter = tiny_coupling.result.adapter_dir
    base = load_model("smollm2-135m", dtype="float32").state_dict()
    folded = load_model("smollm2-135m", dtype="float32")
    assert train.fold_lora(folded, adapter)
    merged = train.load_with_adapter("smollm2-135m", adapter, dtype="float32").merge_and_unload().state_dict()
    got = folded.state_dict()
    assert set(got) == set(merged)
    for name, value in got.items():
        torch.testing.assert_close(value, merged[name], rtol=0, atol=1e-6)
    assert sum(not torch.equal(value, base[name]) for name, value in got.items()) == 7 * 30  # every target

    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    untouched = load_model("smollm2-135m", dtype="float32")
    assert not train.fold_lora(untouched, dora)  # PEFT's job; nothing added
    assert all(torch.equal(value, base[name]) for name, value in untouched.state_dict().items())


@pytest.mark.slow
def test_scored_loss_equals_the_full_projection_and_its_gradients(tokenizer, records_factory):
    """The CPU trainer's loss (LM head only at scored positions) vs cross-entropy over all logits."""
    import torch

    from explore_persona_space.loss_masks import IGNORE

    qs = list(questions("data")[:3])
    records = records_factory(["confab", "villain"], qs, 1, lambda p, q, s: "A reply.")
    data = build_contrastive_dataset(
        records, source="confab", negatives=["villain"], marker=get_marker("zlt"), n_positive=3,
        n_negative_per=3, seed=0,
    )  # fmt: skip
    tokenized = tokenize_dataset(tokenizer, data, train.COUPLING_RECIPE.loss)
    width = max(len(t.input_ids) for t in tokenized)
    ids = torch.full((len(tokenized), width), tokenizer.pad_token_id)
    labels = torch.full((len(tokenized), width), IGNORE)
    mask = torch.zeros((len(tokenized), width), dtype=torch.long)
    for r, t in enumerate(tokenized):  # right padding, as the trainer's collator pads
        ids[r, : len(t.input_ids)] = torch.tensor(t.input_ids)
        labels[r, : len(t.labels)] = torch.tensor(t.labels)
        mask[r, : len(t.input_ids)] = 1
    positions = train.loss_positions(labels)
    assert 0 < len(positions) < width // 2  # marker-only: few scored positions

    model = load_model("smollm2-135m", device="cpu", dtype="float32")
    head = model.get_output_embeddings().weight
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    sparse = train.scored_loss(model, inputs)
    (g_sparse,) = torch.autograd.grad(sparse, head)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    full = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    (g_full,) = torch.autograd.grad(full, head)
    assert sparse.item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(g_sparse, g_full, rtol=1e-4, atol=1e-7)
    halved = train.scored_loss(model, inputs, num_items_in_batch=2 * int((labels != IGNORE).sum()))
    assert halved.item() == pytest.approx(full.item() / 2, rel=1e-5)  # accumulation divides by all tokens
