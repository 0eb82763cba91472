"""The vLLM backend's logic on CPU: GPU hand-over, memory sizing, adapter checks and error mapping.

vLLM itself needs CUDA, so these tests stand in for the two outside calls only:
``torch.cuda`` (a :class:`FakeCuda` whose memory is held by real Python objects
and freed when they are collected) and the ``vllm`` package (modules in
``sys.modules`` exposing the names the backend imports: ``LLM``,
``SamplingParams``, ``LoRARequest``, ``PEFTHelper``, ``LoRAConfig``, the engine
exceptions). Everything of ours - tokenizing, seeding, merging an adapter on
CPU, restarting the engine - runs for real on the embedded model. The real vLLM
runs in ``test_generate.py::test_vllm_records_match_transformers_shape`` on a GPU.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import weakref
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import ClassVar

import pytest

from explore_persona_space import models
from explore_persona_space.generate import Prompt, SamplingConfig, encode_prompts, generate, persona_prompts
from explore_persona_space.generate_vllm import (
    MEMORY_CAP,
    GPUMemoryError,
    VLLMOptions,
    engine_environment,
    engine_memory_fraction,
    engine_settings,
    hand_over_gpu,
    lora_blockers,
    stage_key_fields,
    vllm_dtype,
)
from explore_persona_space.models import EMBEDDED_ALIAS
from explore_persona_space.personas import questions
from explore_persona_space.results import validate_raw_completions
from explore_persona_space.seeds import derive_seed

GIB = 1 << 30
MODEL = EMBEDDED_ALIAS
CFG = SamplingConfig(n_samples=2, max_new_tokens=8, batch_size=3, seed=7)


class FakeCuda:
    """``torch.cuda``'s memory calls over a pretend 80 GiB card.

    ``hold(obj, n)`` allocates n bytes owned by ``obj``: when ``obj`` is garbage
    collected they move to torch's cache (still not free to another process),
    and only ``empty_cache`` gives cached bytes back, as the caching allocator does.
    """

    def __init__(self, total: int = 80 * GIB, context: int = GIB // 2) -> None:
        self.total, self.allocated, self.cached, self.context = total, 0, 0, context
        self.calls: list[str] = []

    def hold(self, obj: object, n: int) -> None:
        self.allocated += n
        weakref.finalize(obj, self._release, n)

    def _release(self, n: int) -> None:
        self.allocated -= n
        self.cached += n

    def is_available(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.calls.append("synchronize")

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")
        self.cached = 0

    def mem_get_info(self) -> tuple[int, int]:
        self.calls.append("mem_get_info")
        return self.total - self.context - self.allocated - self.cached, self.total


class _Weights:
    """A stand-in for a model's tensors: a reference cycle, as a trainer and its model form."""

    def __init__(self) -> None:
        self.me = self


def test_hand_over_frees_the_resident_model_and_the_trainers_cycles_before_measuring(monkeypatch):
    cuda = FakeCuda()
    resident, trainer_state = _Weights(), _Weights()
    cuda.hold(resident, 16 * GIB)  # a 7B base kept resident by train_lora
    cuda.hold(trainer_state, 40 * GIB)  # optimizer state of a finished trainer, only in a cycle now
    monkeypatch.setitem(models._RESIDENT, ("base", "cuda", "torch.bfloat16"), resident)
    del resident, trainer_state
    before = cuda.mem_get_info()[0]
    assert before < 24 * GIB  # vLLM's 0.85 x 80 GiB would not fit now

    free, total = hand_over_gpu(cuda)

    assert not models._RESIDENT and cuda.allocated == 0 and cuda.cached == 0
    assert (free, total) == (80 * GIB - GIB // 2, 80 * GIB)
    assert cuda.calls[-3:] == ["synchronize", "empty_cache", "mem_get_info"]  # measured after release
    assert engine_settings(VLLMOptions(), cuda)["gpu_memory_utilization"] == MEMORY_CAP


def test_memory_fraction_from_measurement_or_checked_request():
    total = 80 * GIB
    assert engine_memory_fraction(79 * GIB, total, None) == MEMORY_CAP
    # another process holds 40 GiB: take what is free less the reserve, not vLLM's default
    frac = engine_memory_fraction(40 * GIB, total, None)
    assert frac == round((40 - 2) / 80, 3) and frac * total <= 40 * GIB
    assert engine_memory_fraction(40 * GIB, total, 0.4) == 0.4
    with pytest.raises(GPUMemoryError, match=r"asks for 48.0 GiB but only 40.0 of 80.0 GiB are free"):
        engine_memory_fraction(40 * GIB, total, 0.6)
    with pytest.raises(GPUMemoryError, match="another process holds the GPU"):
        engine_memory_fraction(3 * GIB, total, None)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMOptions(gpu_memory_utilization=1.5)


def test_engine_settings_without_cuda_pass_a_requested_fraction_through():
    class NoCuda(FakeCuda):
        def is_available(self) -> bool:
            return False

    assert engine_settings(VLLMOptions(), NoCuda()) == {"enforce_eager": False}
    opts = VLLMOptions(gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=1024)
    assert engine_settings(opts, NoCuda()) == {
        "enforce_eager": True,
        "gpu_memory_utilization": 0.3,
        "max_model_len": 1024,
    }


def test_dtype_temperature_environment_and_stage_key(monkeypatch):
    monkeypatch.delenv("EPS_DTYPE", raising=False)
    assert vllm_dtype(None) == "bfloat16"  # what the transformers backend uses on CUDA
    monkeypatch.setenv("EPS_DTYPE", "float32")
    assert vllm_dtype(None) == "float32" and vllm_dtype("float16") == "float16"
    with pytest.raises(ValueError, match=r"temperature <= 2\.0"):
        SamplingConfig(temperature=2.5)
    assert SamplingConfig(temperature=2.0).temperature == 2.0
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    assert engine_environment(VLLMOptions()) == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    env = engine_environment(VLLMOptions(deterministic=True))
    assert env["VLLM_BATCH_INVARIANT"] == "1"
    assert stage_key_fields(VLLMOptions(gpu_memory_utilization=0.5), "auto") == {}
    assert stage_key_fields(VLLMOptions(deterministic=True), "vllm") == {"vllm_deterministic": True}
    assert stage_key_fields(VLLMOptions(deterministic=True), "transformers") == {}


def test_stage_keys_change_only_for_batch_invariance():
    from explore_persona_space.stages import generate_stage

    def key(**kw):
        return generate_stage("eval", ["assistant"], "eval", CFG, base=MODEL, **kw).key

    plain = key()
    assert key(vllm=VLLMOptions(gpu_memory_utilization=0.4, enforce_eager=True)) == plain
    assert key(vllm=VLLMOptions(deterministic=True)) != plain


def test_lora_blockers_follow_vllms_feature_list(tmp_path):
    cfg = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "modules_to_save": ["score"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    assert lora_blockers(tmp_path) == ["modules_to_save=['score']"]  # vLLM: "only ... None"


# ----------------------------------------------------------------------------- a stand-in vllm package
class FakeEngineDeadError(Exception):
    """vllm.v1.engine.exceptions.EngineDeadError: the engine core process died."""


class _FakeLLM:
    """Stands in for vllm.LLM: echoes each request's seed; ``die_with_lora`` kills it on a LoRA."""

    made: ClassVar[list[dict]] = []
    env: ClassVar[list[dict]] = []
    die_with_lora: ClassVar[bool] = False

    def __init__(self, **kwargs):
        _FakeLLM.made.append(kwargs)
        _FakeLLM.env.append(
            {k: os.environ.get(k) for k in ("VLLM_BATCH_INVARIANT", "VLLM_WORKER_MULTIPROC_METHOD")}
        )

    def generate(self, prompts, params, *, use_tqdm, lora_request):
        if lora_request is not None and _FakeLLM.die_with_lora:
            raise FakeEngineDeadError("EngineCore encountered an issue. See stack trace for the root cause.")
        return [
            SimpleNamespace(
                request_id=str(k),
                prompt_token_ids=p["prompt_token_ids"],
                outputs=[SimpleNamespace(text=f"s{sp.seed}", token_ids=[5, 2], finish_reason="stop")],
            )
            for k, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]


class _FakePEFTHelper:
    """vllm.lora.peft_helper.PEFTHelper: reads adapter_config.json, refuses what vLLM refuses."""

    refuse: ClassVar[str | None] = None

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def from_local_dir(cls, path, max_position_embeddings):
        return cls(json.loads((Path(path) / "adapter_config.json").read_text()))

    def validate_legal(self, lora_config):
        if self.cfg["r"] > lora_config.max_lora_rank:
            raise ValueError("LoRA rank is greater than max_lora_rank")
        if _FakePEFTHelper.refuse:
            raise ValueError(_FakePEFTHelper.refuse)


@pytest.fixture
def fake_vllm(monkeypatch):
    def module(name: str, **attrs) -> ModuleType:
        mod = ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    module("vllm", LLM=_FakeLLM, SamplingParams=lambda **kw: SimpleNamespace(**kw), TokensPrompt=dict)
    module("vllm.lora")
    module("vllm.lora.request", LoRARequest=lambda name, int_id, path: (name, int_id, path))
    module("vllm.lora.peft_helper", PEFTHelper=_FakePEFTHelper)
    module("vllm.config")
    module("vllm.config.lora", LoRAConfig=lambda **kw: SimpleNamespace(**kw))
    module("vllm.v1")
    module("vllm.v1.engine")
    module("vllm.v1.engine.exceptions", EngineDeadError=FakeEngineDeadError, EngineGenerateError=RuntimeError)
    _FakeLLM.made.clear()
    _FakeLLM.env.clear()
    _FakeLLM.die_with_lora = False
    _FakePEFTHelper.refuse = None
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.delenv("EPS_DTYPE", raising=False)


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return persona_prompts(["villain", "assistant"], questions("generic")[:2])


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A tiny LoRA with random weights on the embedded model, saved as train_lora saves one."""
    from peft import get_peft_model

    from explore_persona_space.models import load_model
    from explore_persona_space.train import TrainConfig, lora_config

    lcfg = lora_config(TrainConfig(r=4, alpha=8, dropout=0.0))
    lcfg.init_lora_weights = False
    out = tmp_path_factory.mktemp("adapter") / "lora"
    get_peft_model(load_model(MODEL, device="cpu"), lcfg).save_pretrained(out)
    return out


def _expect_seeded(recs, prompts, tokenizer):
    validate_raw_completions(recs)
    encoded = encode_prompts(tokenizer, prompts)
    assert [(r["persona"], r["question"], r["sample"]) for r in recs] == [
        (p.persona, p.question, s) for p in prompts for s in range(CFG.n_samples)
    ]
    for r in recs:
        i = next(k for k, p in enumerate(prompts) if (p.persona, p.question) == (r["persona"], r["question"]))
        assert r["prompt_tokens"] == len(encoded[i])
        assert r["text"] == f"s{derive_seed(CFG.seed, r['persona'], r['question'], r['sample'])}"
        assert (r["completion_tokens"], r["finish_reason"]) == (2, "stop")


@pytest.mark.slow
def test_vllm_backend_serves_a_valid_adapter_as_a_lora(fake_vllm, prompts, tokenizer, adapter_dir):
    recs = generate(
        MODEL, prompts, CFG, adapter=adapter_dir, backend="vllm", progress=False,
        vllm=VLLMOptions(deterministic=True),
    )  # fmt: skip
    _expect_seeded(recs, prompts, tokenizer)
    (made,) = _FakeLLM.made
    assert made["enable_lora"] and made["max_lora_rank"] == 8 and made["dtype"] == "bfloat16"
    assert _FakeLLM.env == [{"VLLM_BATCH_INVARIANT": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}]
    assert "VLLM_BATCH_INVARIANT" not in os.environ  # put back once the engine is closed


@pytest.mark.slow
def test_engine_death_on_the_adapter_merges_it_and_restarts(
    fake_vllm, prompts, tokenizer, adapter_dir, caplog
):
    _FakeLLM.die_with_lora = True
    recs = generate(MODEL, prompts, CFG, adapter=adapter_dir, backend="vllm", progress=False)
    _expect_seeded(recs, prompts, tokenizer)
    first, second = _FakeLLM.made
    assert first["enable_lora"] and "enable_lora" not in second
    assert Path(second["model"]).name == "model" and "eps-merged-" in second["model"]
    assert not Path(second["model"]).exists()  # the merged copy is removed on close
    assert "FakeEngineDeadError" in caplog.text and "merging it and restarting" in caplog.text


@pytest.mark.slow
def test_vllms_own_validation_merges_before_any_lora_engine_starts(fake_vllm, prompts, adapter_dir, caplog):
    _FakePEFTHelper.refuse = "vLLM only supports modules_to_save being None."
    recs = generate(MODEL, prompts, CFG, adapter=adapter_dir, backend="vllm", progress=False)
    assert len(recs) == len(prompts) * CFG.n_samples
    (only,) = _FakeLLM.made
    assert "enable_lora" not in only and "eps-merged-" in only["model"]
    assert "vLLM: vLLM only supports modules_to_save being None." in caplog.text


def test_a_non_adapter_failure_is_not_retried(fake_vllm, prompts):
    class Broken(_FakeLLM):
        def generate(self, *a, **kw):
            raise FakeEngineDeadError("out of memory")

    sys.modules["vllm"].LLM = Broken
    with pytest.raises(FakeEngineDeadError, match="out of memory"):
        generate(MODEL, prompts, CFG, backend="vllm", progress=False)
    assert len(_FakeLLM.made) == 1  # no adapter in play: no merge, no second engine
