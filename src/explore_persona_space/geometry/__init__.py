"""Activation geometry of personas: persona vectors from hidden states, and metrics over them.

A *persona vector* is the mean hidden state of a model, at one layer, over a
bank of questions asked under one persona's system prompt. Two readings of
"the hidden state of a prompt" (write-up 003's Methods):

* **Method A** - the hidden state of the last input token: the rendered chat
  (system + user + the generation prompt), i.e. the state from which the first
  answer token is predicted;
* **Method B** - the mean hidden state over the tokens of the model's own greedy
  response to that prompt, teacher-forced after it.

:mod:`.extract` computes both, per persona x question, at write-up layers mapped
to the model's depth (:func:`map_layers`), and stores them as safetensors;
:mod:`.metrics` holds M1 (collapse of inter-persona cosine), M2 (shift along an
EM axis) and M3 (held-out nearest-centroid persona classification), each with
its test. The stage builder that runs an extraction inside a pipeline is
:func:`explore_persona_space.stages.geometry_stage`.
"""

from explore_persona_space.geometry.extract import (
    METHODS,
    VECTORS,
    WRITEUP_DEPTH,
    WRITEUP_LAYERS,
    load_vectors,
    map_layers,
    persona_states,
    save_vectors,
)
from explore_persona_space.geometry.metrics import (
    M1Result,
    M2Result,
    M3Result,
    em_axis,
    m1,
    m1_test,
    m2_test,
    nearest_centroid,
    pair_cosines,
    question_folds,
)

__all__ = [
    "METHODS",
    "VECTORS",
    "WRITEUP_DEPTH",
    "WRITEUP_LAYERS",
    "M1Result",
    "M2Result",
    "M3Result",
    "em_axis",
    "load_vectors",
    "m1",
    "m1_test",
    "m2_test",
    "map_layers",
    "nearest_centroid",
    "pair_cosines",
    "persona_states",
    "question_folds",
    "save_vectors",
]
