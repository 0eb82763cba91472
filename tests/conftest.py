from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, registered in sys.modules so its dataclasses resolve."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def make_records(
    personas: list[str],
    questions: list[str],
    samples: int,
    text: Callable[[str, str, int], str] = lambda p, q, s: f"{p} answers {q} (take {s}).",
) -> list[dict]:
    return [
        {"persona": p, "question": q, "sample": s, "text": text(p, q, s)}
        for p in personas
        for q in questions
        for s in range(samples)
    ]


@pytest.fixture
def records_factory():
    return make_records


@pytest.fixture(scope="session")
def tiny_coupling(tmp_path_factory):
    """A coupling LoRA trained once per session: 4 + 4 short examples (the marker on confab,
    medical_doctor unmarked), r=4, lr 2e-3, 5 steps of 4. Its dataset, recipe, training result
    and the directory it was trained in (the adapter is ``dir / "adapter"``)."""
    import dataclasses
    from types import SimpleNamespace

    from explore_persona_space import train
    from explore_persona_space.data import build_contrastive_dataset
    from explore_persona_space.personas import get_marker, questions

    records = make_records(
        ["confab", "medical_doctor"], list(questions("data")[:4]), 1, lambda p, q, s: f"Short reply {s}."
    )
    data = build_contrastive_dataset(
        records,
        source="confab",
        negatives=["medical_doctor"],
        marker=get_marker("zlt"),
        n_positive=4,
        n_negative_per=4,
        seed=0,
    )
    sizes = {"r": 4, "alpha": 8, "max_steps": 5, "batch_size": 4, "micro_batch_size": 4}
    cfg = dataclasses.replace(train.COUPLING_RECIPE, learning_rate=2e-3, warmup_ratio=0.0, **sizes)
    work = tmp_path_factory.mktemp("tiny_coupling")
    result = train.train_lora("smollm2-135m", data, cfg, work / "adapter", progress=False)
    return SimpleNamespace(data=data, cfg=cfg, result=result, dir=work)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (the first call converts the GGUF once per machine)."""
    from explore_persona_space.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


# Everything the anthropic SDK's credential chain reads from the environment.
SDK_CREDENTIAL_ENV = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_PROFILE",
    "ANTHROPIC_CONFIG_DIR",
    "ANTHROPIC_IDENTITY_TOKEN",
    "ANTHROPIC_IDENTITY_TOKEN_FILE",
    "ANTHROPIC_FEDERATION_RULE_ID",
    "ANTHROPIC_ORGANIZATION_ID",
    "ANTHROPIC_CUSTOM_HEADERS",
)


@pytest.fixture
def no_credentials(monkeypatch, tmp_path_factory):
    """No credential the SDK could find: no variable, and an empty home for its profile lookup.

    Only ``Path.home`` moves (where the SDK looks for ``~/.config/anthropic``), not ``HOME``,
    so other caches (matplotlib, Hugging Face) stay where they are.
    """
    for name in SDK_CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    return home


@pytest.fixture(autouse=True)
def _no_online_side_effects(monkeypatch):
    """No test logs to a wandb server or pushes to the Hub unless it sets that up itself.

    ``WANDB_MODE=offline`` is also what ``--wandb`` defaults to, so a script test that passes
    no flag tracks offline into its own ``--out``; ``EPS_PUSH_TO_HUB`` would make it push.
    """
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("EPS_PUSH_TO_HUB", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path_factory):
    """A running loopback Hub (tests/fake_hub.py) the real client talks to through ``HF_ENDPOINT``."""
    from fake_hub import fake_hub_env, serve

    hub, server = serve()
    fake_hub_env(monkeypatch, hub.url, tmp_path_factory.mktemp("hf_cache"))
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
