"""Attention functions that compute what SDPA computes with less memory traffic.

Two are registered with transformers' attention interface, each falling back to
the stock SDPA function (and mask) wherever its fast case does not apply, so
switching a model to one never changes what it computes, only how.

Decode with grouped key/value heads (``DECODE_NAME``). Qwen2.5-7B has 28 query
heads sharing 4 key/value heads. With a padding mask (left-padded batches),
transformers' SDPA path first copies every cached key and value 7 times
(``repeat_kv``), because the masked CUDA kernels take no grouped heads: at batch
256 and ~400 cached tokens that is tens of GB written and read again per decode
step, several times the weights' own 15 GB. For a single query position the
copy is unnecessary: the 7 query heads of one group can sit in the query-length
axis of one SDPA call against their shared key/value head, under the same mask.

Padding-free training batches (``VARLEN_NAME``).

A padding-free micro-batch is one row holding several examples back to back,
with position ids restarting at 0 for each (never packing across batches: the
examples are exactly those of the padded micro-batch). transformers' SDPA path
keeps the examples apart with a block-diagonal mask over the whole row, so its
kernels compute every (query, key) pair of the row: with 16 examples of ~440
tokens that is 16x the attention work of the padded batch. PyTorch's
``varlen_attn`` (flash attention over cumulative sequence lengths) computes only
the blocks on the diagonal.

The varlen kernel is used only when the batch carries ``cu_seq_lens_q`` (the
padding-free collator adds them), runs on CUDA in bf16 or fp16 and has one row.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

VARLEN_NAME = "eps_varlen_sdpa"
DECODE_NAME = "eps_grouped_decode_sdpa"


def varlen_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _causal_kwargs() -> dict[str, Any]:
    """``varlen_attn`` spelled causality as ``is_causal`` before it grew ``window_size``."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq = kwargs.get("cu_seq_lens_q")
    half = query.dtype in (torch.bfloat16, torch.float16)  # the flash kernel takes no fp32
    if cu_seq is None or not query.is_cuda or not half or query.shape[0] != 1 or dropout:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    from torch.nn.attention.varlen import varlen_attn

    # [1, heads, T, dim] -> [T, heads, dim]; grouped key/value heads repeated the way
    # transformers' repeat_kv does (kv head j serves query heads j*n .. j*n+n-1).
    n_rep = query.shape[1] // key.shape[1]
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).repeat_interleave(n_rep, dim=1).contiguous()
    v = value[0].transpose(0, 1).repeat_interleave(n_rep, dim=1).contiguous()
    cu_seq = cu_seq.to(device=q.device, dtype=torch.int32)
    longest = int(kwargs.get("max_length_q") or int((cu_seq[1:] - cu_seq[:-1]).max()))
    out = varlen_attn(q, k, v, cu_seq, cu_seq, longest, longest, scale=scaling, **_causal_kwargs())
    return out.unsqueeze(0), None  # [1, T, heads, dim], as sdpa_attention_forward returns


def grouped_decode_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or dropout or q_heads == kv_heads:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    group = q_heads // kv_heads
    # Query heads j*group .. j*group+group-1 use key/value head j (transformers' repeat_kv order).
    q = query.reshape(batch, kv_heads, group, dim)
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]].expand(batch, 1, group, key.shape[-2])
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, 1, q_heads, dim), None  # [batch, q_len=1, heads, dim]


@functools.cache
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    functions = {VARLEN_NAME: varlen_attention_forward, DECODE_NAME: grouped_decode_attention_forward}
    for name, fn in functions.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


@contextmanager
def attention(model: Any, name: str, enabled: bool = True) -> Iterator[bool]:
    """Run ``model`` with attention ``name`` inside the block; the previous implementation comes back after.

    Yields whether it is on: only for a model whose attention implementation is
    SDPA, since the fallback must compute what the model computed before.
    """
    base = getattr(model, "get_base_model", lambda: model)()
    before = base.config._attn_implementation
    if not enabled or before != "sdpa":
        if enabled:
            log.info("attention %s not used: the model runs %s, not sdpa", name, before)
        yield False
        return
    register()
    base.set_attn_implementation(name)
    try:
        yield True
    finally:
        base.set_attn_implementation(before)


def varlen_attention(model: Any, enabled: bool = True) -> Any:
    """:func:`attention` with the varlen kernel, for a model on a CUDA device that has one."""
    on_cuda = next(model.parameters()).is_cuda
    return attention(model, VARLEN_NAME, enabled and on_cuda and varlen_available())


def grouped_decode_attention(model: Any, enabled: bool = True) -> Any:
    return attention(model, DECODE_NAME, enabled)
