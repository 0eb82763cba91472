"""Seed derivation that never depends on Python's ``hash()``.

The write-ups had to pin PYTHONHASHSEED to get the same negative personas twice;
here every sub-seed is a SHA-256 of its parts, so the same inputs give the same
seed on any machine and under any hash seed.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed determined by ``seed`` and the ``repr`` of each part."""
    payload = "\x1f".join([str(int(seed)), *(repr(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(payload.encode("utf-8")).digest()[:8], "big") >> 1


def rng_for(seed: int, *parts: object) -> random.Random:
    return random.Random(derive_seed(seed, *parts))
