"""The bound formulas the GPU benchmark divides by, on the Qwen2.5-7B shape."""

import pytest

from explore_persona_space import models
from explore_persona_space.bench import bounds

PARAMS = 7_615_616_512  # the Qwen2.5-7B shape's parameter count


def test_training_bound_is_four_flops_per_parameter_and_token():
    assert bounds.lora_train_bound(800.0, PARAMS) == pytest.approx(800e12 / (4 * PARAMS))


@pytest.mark.slow  # a subprocess or a heavy import: seconds on 2 cores
def test_decode_bound_is_memory_bound_at_small_batch_and_compute_bound_at_large():
    conf = models.qwen25_7b_config()
    kv_per_token = 2 * 28 * 4 * 128 * 2  # K and V, 28 layers, 4 kv heads of 128, bf16
    small = bounds.decode_bound(conf, PARAMS, 8, 500, 3e12, 800)
    assert small == pytest.approx(8 / ((2 * PARAMS + 8 * 500 * kv_per_token) / 3e12))
    large = bounds.decode_bound(conf, PARAMS, 4096, 100, 3e12, 800)
    assert large == pytest.approx(800e12 / (2 * PARAMS))  # 2N FLOPs per new token
