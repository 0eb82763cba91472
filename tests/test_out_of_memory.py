"""A CUDA out-of-memory error in training or sampling: one clear message, the model released,
the stage left unfinished.

No GPU here, so the error is raised where the accelerator would raise it - inside the
trainer's step loop and inside a sampling batch - by patching those two functions only;
everything around them (the stage, the model load, the resident-model bookkeeping, the
pipeline's finished marker) is the real code path.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from explore_persona_space import generate, models, pipeline, stages, train
from explore_persona_space.errors import StageOutOfMemoryError, error_line
from explore_persona_space.loss_masks import LossSpec
from explore_persona_space.pipeline import Cell
from explore_persona_space.sampling import SamplingConfig
from explore_persona_space.sft_data import BENIGN_CHAT_FIXTURE, hf_chat_spec
from explore_persona_space.train import TrainConfig

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB"


def _oom():
    import torch

    return torch.cuda.OutOfMemoryError(OOM)


def _fails_unfinished(root, stage) -> StageOutOfMemoryError:
    with pytest.raises(StageOutOfMemoryError) as err:
        pipeline.run_cells(root, [Cell("c", stage)], progress=False)
    assert not pipeline.is_done(root, stage)  # unfinished: the next run recomputes it
    assert pipeline.stage_dir(root, stage).is_dir()
    assert err.value.__cause__ is None and err.value.__context__ is not None
    assert err.value.__context__.__traceback__ is None  # its frames (and the model in them) let go
    return err.value


@pytest.mark.slow  # loads the embedded model
def test_training_oom_names_the_stage_batch_and_knob_and_releases_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("EPS_RESIDENT", "1")  # the resident base is what a GPU run keeps between stages
    held = {}

    def step_loop_runs_out(trainer, cfg):
        held["model"] = weakref.ref(trainer.model)
        raise _oom()

    monkeypatch.setattr(train, "run_trainer", step_loop_runs_out)
    loss = LossSpec("assistant_only")
    cfg = TrainConfig(r=4, alpha=8, batch_size=4, micro_batch_size=2, epochs=1, loss=loss)
    stage = stages.train_stage(
        "couple", cfg, hf_chat_spec(BENIGN_CHAT_FIXTURE, 4), base="smollm2-135m", knob="couple_micro_batch"
    )
    err = _fails_unfinished(tmp_path, stage)
    assert str(err) == (
        "stage 'couple' ran out of GPU memory while training (micro-batch 2 of batch 4 (on CUDA "
        "grow_micro_batch may have raised it to fit)): lower it with --set couple_micro_batch=<smaller>; "
        f"the stage is left unfinished [{OOM}]"
    )
    assert error_line(err) == (str(err), 1)
    assert models._RESIDENT == {}  # the resident base is dropped
    gc.collect()
    assert held["model"]() is None  # and the trained model is gone with the frames that held it


@pytest.mark.slow  # loads the embedded model
def test_sampling_oom_names_the_stage_and_batch_and_releases_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("EPS_RESIDENT", "1")
    held = {}

    def batch_runs_out(model, *args, **kwargs):
        held["model"] = weakref.ref(model)
        raise _oom()

    monkeypatch.setattr(generate, "hf_sample", batch_runs_out)
    sampling = SamplingConfig(1, max_new_tokens=2, batch_size=32)
    stage = stages.generate_stage(
        "eval", ["assistant"], "eval", sampling, base="smollm2-135m", n_questions=1, backend="transformers"
    )
    err = _fails_unfinished(tmp_path, stage)
    assert str(err).startswith(
        "stage 'eval' ran out of GPU memory while sampling (batch of 32 rows (fast decode 512)): lower it "
        "with a smaller batch_size (SamplingConfig); the stage is left unfinished [CUDA out of memory."
    )
    assert models._RESIDENT == {}
    gc.collect()
    assert held["model"]() is None
