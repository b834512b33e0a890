"""Counter-based hashing on int64 tensors: the random numbers both services draw without RNG state.

T3's sampler (``token_service.t3.sampling``) and S3Gen's positional noise
(``vocoder_service.s3gen.noise``) need numbers that are a pure function of (seed, counter), equal
on every device and inside CUDA graphs. Both use this mix on int64 tensors holding 32-bit values
(products wrap in two's complement on CPU and CUDA; the mask keeps the low 32 bits).
"""
from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF


def hash32(x: Tensor | int) -> Tensor | int:
    """"lowbias32" (a 32-bit integer mix) on int64 tensors holding values in [0, 2**32), or on one such
    Python int (the same operations; Python ints do not wrap, the masks make the results equal)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def bits_to_unit(bits: Tensor) -> Tensor:
    """32-bit hashes -> float32 strictly inside (0, 1): ``(k + 0.5) / 2**23`` for the top 23 bits ``k``.

    23 bits, not 24: ``(2**24 - 0.5) / 2**24`` rounds to exactly 1.0 in float32, and ``-log(1) = 0``
    would turn ``p / E`` into ``0 / 0 = NaN`` for a filtered-out token in T3's sampler, which
    ``argmax`` then picks (seen as a wrong greedy token once in ~40 CI runs' worth of draws), and
    ``log(1) = 0`` would make Box-Muller's radius 0 in the vocoder's noise.
    """
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
