"""The hardware's ceilings and the floors they put under training and decoding.

Benchmarks report each measured rate beside these bounds, so a number says how
far a path is from what the device allows, not only how it compares with
another path. The ceilings are measured on the device at hand (a large bf16
matrix product, a large device-to-device copy), not read off a datasheet.
"""

from __future__ import annotations

import time
from typing import Any


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 n^3 matrix products on the current CUDA device, mean of ``reps`` after 3 warm-ups."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def copy_bandwidth(gib: float = 2.0, reps: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    import torch

    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * reps / (time.perf_counter() - t)


def lora_train_bound(tflops: float, params: int) -> float:
    """Tokens/s: a frozen base costs 4N FLOPs a token (forward 2N + input gradients 2N)."""
    return tflops * 1e12 / (4 * params)


def decode_bound(
    config: Any, params: int, batch: int, mean_context: float, bandwidth: float, tflops: float
) -> float:
    """New tokens/s: each step reads the bf16 weights and the KV cache at ``mean_context``
    and does 2N FLOPs per row; the slower of the two sets the step time."""
    head_dim = config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    memory_s = (2 * params + batch * mean_context * kv_per_token) / bandwidth
    return batch / max(memory_s, 2 * params * batch / (tflops * 1e12))
