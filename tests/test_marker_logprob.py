"""The continuous leakage score: exact teacher forcing, hand-made statistics, and a coupled adapter."""

import math

import pytest

from explore_persona_space import marker_logprob as ML
from explore_persona_space import train
from explore_persona_space.models import load_model
from explore_persona_space.personas import get_marker, questions

ZLT = get_marker("zlt")


@pytest.fixture(scope="module")
def model():
    return load_model("smollm2-135m", dtype="float32").eval()


def _direct(model, seq, n_tail):
    """log P of the last n_tail tokens, one unpadded sequence, the whole logits tensor."""
    import torch

    ids = torch.tensor([seq])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logp[j - 1, seq[j]]) for j in range(len(seq) - n_tail, len(seq)))


def test_prefix_shared_scores_equal_one_unpadded_pass_each(model, tokenizer):
    """Prefixes and continuations of different lengths; two prefixes share a chunk, the third has its own;
    a chunk's rows run in several length groups (the prefix cache copied)."""
    tail = ML.marker_token_ids(tokenizer, ZLT)
    enc = [
        tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in ("Hi.", "A much longer context that needs padding in a batch of rows.", "Mid length one")
    ]
    bodies = [
        tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in (" yes", " no, not at all, and never again in all the years still to come", "")
    ]
    conts = [(j, [9, *b, *tail]) for j in (2, 0, 1) for b in bodies]  # 9: any last prompt token
    got = ML.prefix_shared_logprobs(model, enc, conts, len(tail), tokenizer.pad_token_id, batch_size=6)
    for value, (j, cont) in zip(got, conts, strict=True):
        assert value == pytest.approx(_direct(model, enc[j] + cont, len(tail)), abs=1e-3)
    assert (
        len(ML.length_groups(sorted(range(9), key=lambda r: len(conts[r][1])), lambda r: len(conts[r][1])))
        > 1
    )
    assert ML.length_groups([0, 1, 2, 3], [3, 5, 6, 13].__getitem__) == [[0, 1, 2], [3]]
    with pytest.raises(ValueError, match="token before"):
        ML.prefix_shared_logprobs(model, enc, [(0, tail)], len(tail), tokenizer.pad_token_id)


def test_score_completions_builds_both_points_from_the_chat_template(model, tokenizer):
    from explore_persona_space.generate import persona_prompts
    from explore_persona_space.sampling import encode_prompts

    q = questions("eval")[0]
    recs = [{"persona": "confab", "question": q, "sample": s, "text": t} for s, t in enumerate(["Yes.", ""])]
    rows = ML.score_completions(model, tokenizer, recs, ZLT)
    assert [r["sample"] for r in rows] == [0, 1]
    assert rows[0]["start"] == rows[1]["start"]  # the start point is the prompt's, shared by its samples
    prompt = encode_prompts(tokenizer, persona_prompts(["confab"], [q]))[0]
    tail = ML.marker_token_ids(tokenizer, ZLT)
    body = tokenizer("Yes." + ML.END_SEP, add_special_tokens=False)["input_ids"]
    assert rows[0]["start"] == pytest.approx(_direct(model, prompt + tail, len(tail)), abs=1e-3)
    assert rows[0]["end"] == pytest.approx(_direct(model, prompt + body + tail, len(tail)), abs=1e-3)
    assert all(r["start"] < 0 and r["end"] < 0 for r in rows)
    with pytest.raises(ValueError, match="points"):
        ML.score_completions(model, tokenizer, recs, ZLT, points=("middle",))


def _scores(values):
    """values: {persona: [[question 0 samples], [question 1 samples], ...]} -> score rows (end point)."""
    return [
        {"persona": p, "question": f"q{j}", "sample": s, "start": x, "end": x}
        for p, per_q in values.items()
        for j, samples in enumerate(per_q)
        for s, x in enumerate(samples)
    ]


def test_summary_means_gap_and_binary_gap_on_hand_made_values():
    values = {
        "src": [[-1.0, -3.0], [-2.0, -2.0], [-1.0, -1.0]],  # mean -10/6
        "b1": [[-6.0, -6.0], [-5.0, -7.0], [-6.0, -6.0]],  # mean -6
        "b2": [[-8.0, -8.0], [-8.0, -8.0], [-9.0, -7.0]],  # mean -8
    }
    scores = _scores(values)
    fired = [s["persona"] == "src" and s["sample"] == 0 for s in scores]  # src 3/6, bystanders 0/12
    out = ML.summarize(scores, source="src", n_boot=500, seed=1, fired=fired)
    end = out["points"]["end"]
    assert end["unit"] == "completion" and end["personas"]["src"]["n"] == 6
    assert end["personas"]["src"]["mean_logprob"] == pytest.approx(-10 / 6)
    assert end["bystander"]["mean_logprob"] == pytest.approx(-7.0)
    assert end["gap"]["logprob"]["estimate"] == pytest.approx(-10 / 6 + 7)
    lo, hi = end["gap"]["logprob"]["ci"]
    assert lo <= end["gap"]["logprob"]["estimate"] <= hi and lo > 0 and end["gap"]["logprob"]["excludes_zero"]
    mean_prob = (3 * math.exp(-1) + math.exp(-3) + 2 * math.exp(-2)) / 6
    assert end["personas"]["src"]["mean_prob"] == pytest.approx(mean_prob)
    # the start point counts each (persona, question) once (its samples share one value in real use)
    start = out["points"]["start"]
    assert start["unit"] == "prompt" and start["personas"]["src"]["n"] == 3
    assert out["binary_gap"]["estimate"] == pytest.approx(0.5)
    assert out["binary_gap"]["ci"][0] <= 0.5 <= out["binary_gap"]["ci"][1]


def test_a_gap_that_flips_across_questions_straddles_zero():
    values = {"src": [[-1.0], [-9.0], [-1.0], [-9.0]], "b": [[-9.0], [-1.0], [-9.0], [-1.0]]}
    out = ML.summarize(_scores(values), source="src", n_boot=500, seed=0)
    gap = out["points"]["end"]["gap"]["logprob"]
    assert gap["estimate"] == pytest.approx(0.0) and not gap["excludes_zero"]
    assert "binary_gap" not in out
    with pytest.raises(KeyError, match="source persona 'nobody'"):
        ML.summarize(_scores(values), source="nobody", n_boot=10, seed=0)


@pytest.mark.slow
def test_a_coupled_adapter_raises_the_markers_log_prob_for_its_source(
    model, tokenizer, records_factory, tiny_coupling
):
    """A tiny coupling LoRA (marker on confab, medical_doctor unmarked); score base vs adapted."""
    personas = ["confab", "medical_doctor"]
    adapted = train.load_with_adapter("smollm2-135m", tiny_coupling.result.adapter_dir, dtype="float32")
    evals = records_factory(personas, list(questions("eval")[:3]), 2, lambda p, q, s: f"An answer, take {s}.")

    def end_summary(m):
        scores = ML.score_completions(m, tokenizer, evals, ZLT, points=("end",))
        return ML.summarize(scores, source="confab", n_boot=300, seed=0)["points"]["end"]

    before, after = end_summary(model), end_summary(adapted)
    src_before = before["personas"]["confab"]["mean_logprob"]
    src_after = after["personas"]["confab"]["mean_logprob"]
    assert src_after > src_before + 1.0, (src_before, src_after)  # nats: the marker became likelier
    assert after["personas"]["confab"]["mean_prob"] > before["personas"]["confab"]["mean_prob"]
    # Five steps raise the marker for the unmarked negative too (measured: the gap stays ~1.4 nats),
    # so only the source's own rise is asserted; the source stays above the negative after coupling.
    assert after["gap"]["logprob"]["estimate"] > 0
