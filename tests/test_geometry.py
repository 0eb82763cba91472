"""Persona-vector geometry: M1/M2/M3 on synthetic vectors whose answers are known, the layer map,
safetensors storage, and hidden-state extraction on the embedded model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from explore_persona_space import geometry as G
from explore_persona_space.personas import questions

P, Q, H = 12, 20, 64
PERSONAS = [f"p{i}" for i in range(P)]


def clusters(spread: float, noise: float, seed: int = 0, offset: float = 5.0) -> np.ndarray:
    """Per-question states [P, Q, H]: persona centres ``spread`` apart around a common offset, plus noise."""
    rng = np.random.default_rng(seed)
    common = offset * rng.normal(size=H)
    centres = common + spread * rng.normal(size=(P, 1, H))
    return centres + noise * rng.normal(size=(P, Q, H))


def test_m3_is_perfect_on_well_separated_clusters_and_chance_on_collapsed_ones():
    separated = G.nearest_centroid(clusters(spread=3.0, noise=0.1), n_folds=5, seed=1)
    assert separated.accuracy == 1.0 and (separated.correct, separated.n) == (P * Q, P * Q)
    assert separated.chance == pytest.approx(1 / 12) and separated.wilson[0] > 0.98
    collapsed = G.nearest_centroid(clusters(spread=0.0, noise=1.0), n_folds=5, seed=1)
    assert collapsed.accuracy < 0.2  # chance is 1/12: nothing separates the personas
    assert len(collapsed.fold_accuracy) == 5 and len(collapsed.per_persona) == P


def test_m3_centroids_never_see_the_held_out_question():
    # Pure noise, two questions: a centroid that included its test row would sit halfway to it and win
    # (~100%); a held-out centroid is the other question's row alone, unrelated: chance (1/12).
    noise = np.random.default_rng(5).normal(size=(P, 2, 256))
    res = G.nearest_centroid(noise, n_folds=2, seed=0)
    assert res.accuracy < 0.35
    leaky = np.linalg.norm(noise[:, :, None] - noise.mean(axis=1)[None, None], axis=-1).argmin(-1)
    assert (leaky == np.arange(P)[:, None]).mean() > 0.9  # what the bug would have reported


def test_question_folds_partition_the_questions_deterministically():
    folds = G.question_folds(10, 4, seed=42)
    assert sorted(np.concatenate(folds).tolist()) == list(range(10))
    assert sorted(len(f) for f in folds) == [2, 2, 3, 3]
    assert [f.tolist() for f in folds] == [f.tolist() for f in G.question_folds(10, 4, seed=42)]
    assert [f.tolist() for f in folds] != [f.tolist() for f in G.question_folds(10, 4, seed=43)]
    with pytest.raises(ValueError, match="folds"):
        G.question_folds(3, 4, seed=0)


def test_m1_goes_to_one_when_personas_collapse_and_the_test_sees_it():
    base = clusters(spread=3.0, noise=0.0).mean(axis=1)
    rng = np.random.default_rng(7)
    collapsed = base.mean(axis=0) + 4.0 * rng.normal(size=H) + 0.01 * (base - base.mean(axis=0))
    centre = base.mean(axis=0)
    assert G.m1(collapsed, centre) > 0.99 and G.m1(collapsed) > 0.99  # base-centred and raw
    res = G.m1_test(collapsed, base, centre)
    assert res.n_pairs == 66 and res.delta > 1.0 and res.p < 1e-10
    assert res.m1_base == pytest.approx(-1 / 11, abs=0.05)  # base in its own frame: ~ -1/(P-1)
    same = G.m1_test(base, base, centre)
    assert (same.delta, same.p, same.statistic) == (0.0, 1.0, None)


def test_m1_centred_on_each_conditions_own_mean_is_a_constant():
    # Why the experiment centres every condition on the base mean: per-condition centring gives
    # -1/(P-1) whatever the vectors are (exactly, for equal centred norms - a regular simplex).
    simplex = np.eye(P)
    assert G.m1(simplex, simplex.mean(axis=0)) == pytest.approx(-1 / (P - 1))
    squeezed = 100 + 1e-3 * np.eye(P)  # collapsed to one point, same shape: same number
    assert G.m1(squeezed, squeezed.mean(axis=0)) == pytest.approx(-1 / (P - 1))
    assert G.pair_cosines(simplex).shape == (66,)


def test_m2_measures_the_shift_along_the_axis_in_its_units():
    rng = np.random.default_rng(11)
    base = rng.normal(size=(P, H))
    e0 = base + np.array([1.0] + [0.0] * (H - 1)) * 3.0
    axis = G.em_axis(e0, base)
    names = ["assistant", *PERSONAS[1:]]
    full = G.m2_test(e0, base, axis, names, exclude=("assistant",))
    assert full.n == 11 and "assistant" not in full.shift
    assert full.mean_shift == pytest.approx(1.0) and full.mean_cosine == pytest.approx(1.0)
    assert full.p == pytest.approx(2 / 2**11)  # all 11 positive: the exact two-sided minimum
    half_back = G.m2_test(base - 0.5 * axis, base, axis, names, exclude=("assistant",))
    assert half_back.mean_shift == pytest.approx(-0.5) and half_back.mean_cosine == pytest.approx(-1.0)
    sideways = base + np.array([0.0, 2.0] + [0.0] * (H - 2))
    side = G.m2_test(sideways, base, axis, names)
    assert side.mean_shift == pytest.approx(0.0) and side.p == 1.0 and side.n == 12
    with pytest.raises(ValueError, match="zero"):
        G.em_axis(base, base)


def test_layers_map_by_relative_depth():
    assert G.map_layers(G.WRITEUP_LAYERS, 28) == {7: 7, 14: 14, 20: 20, 21: 21, 27: 27}
    assert G.map_layers(G.WRITEUP_LAYERS, 30) == {7: 8, 14: 15, 20: 21, 21: 23, 27: 29}
    with pytest.raises(ValueError, match="collide"):
        G.map_layers(G.WRITEUP_LAYERS, 4)
    with pytest.raises(ValueError, match="outside"):
        G.map_layers([0, 29], 30)


def test_vectors_round_trip_through_safetensors(tmp_path):
    states = {"A": clusters(1.0, 0.1)[:, :, None, :].repeat(2, axis=2).astype(np.float32)}
    meta = {"personas": PERSONAS, "layers": [7, 20]}
    G.save_vectors(tmp_path / G.VECTORS, states, meta)
    arrays, back = G.load_vectors(tmp_path / G.VECTORS)
    assert back == meta and set(arrays) == {"A", "A.persona"}
    np.testing.assert_array_equal(arrays["A"], states["A"])
    np.testing.assert_allclose(arrays["A.persona"], states["A"].mean(axis=1), rtol=1e-6)
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_geometry_bank_is_240_questions_disjoint_from_every_other_bank():
    geo = questions("geometry")
    assert len(geo) == 240 == len(set(geo))

    def norm(q: str) -> str:
        return re.sub(r"[^a-z0-9]+", " ", q.lower()).strip()

    others = {norm(q) for bank in ("eval", "data", "ood") for q in questions(bank)}
    assert not {norm(q) for q in geo} & others


@pytest.mark.slow
def test_extraction_on_the_embedded_model(tokenizer):
    """A is the last prompt token's state and B the mean over the response tokens read back, both as an
    unpadded teacher-forced pass computes them; M3 on the base model is far above chance."""
    import torch

    from explore_persona_space.generate import persona_prompts
    from explore_persona_space.geometry.extract import loaded_model, persona_states
    from explore_persona_space.personas import EVAL_PERSONAS
    from explore_persona_space.sampling import encode_prompts

    personas, qs = list(EVAL_PERSONAS[:6]), list(questions("geometry")[:6])
    prompts = persona_prompts(personas, qs)
    with loaded_model("smollm2-135m", None, "cpu") as model:
        index = list(G.map_layers([7, 20], model.config.num_hidden_layers).values())
        states, done = persona_states(model, tokenizer, prompts, index, max_new_tokens=6, batch_size=8)
        only_a, _ = persona_states(model, tokenizer, prompts[:3], index, batch_size=2, progress=False)
        k = 5  # one row, recomputed without padding or cache: prompt + the tokens read back
        prompt = encode_prompts(tokenizer, [prompts[k]])[0]
        answer = tokenizer(done[k].text, add_special_tokens=False)["input_ids"][: done[k].completion_tokens]
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([prompt + answer]), output_hidden_states=True).hidden_states
    a_ref = np.stack([hs[i][0, len(prompt) - 1].numpy() for i in index])
    b_ref = np.stack([hs[i][0, len(prompt) :].mean(dim=0).numpy() for i in index])
    assert done[k].completion_tokens == len(answer) > 0 and set(states) == {"A", "B"}
    np.testing.assert_allclose(states["A"][k], a_ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(states["B"][k], b_ref, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(only_a["A"], states["A"][:3], rtol=1e-3, atol=1e-3)  # A alone: same numbers
    assert set(only_a) == {"A"}
    acc = G.nearest_centroid(states["A"].reshape(6, 6, 2, -1)[:, :, 1], n_folds=3, seed=42).accuracy
    assert acc > 0.8  # chance is 1/6
