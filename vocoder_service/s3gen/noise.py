"""Reproducible noise addressed by absolute position, so a chunked (streaming) run draws exactly the
same numbers for a frame / sample as an offline run of the same seed.

Noise is generated in fixed blocks; block ``k`` of a stream comes from its own
``torch.Generator`` seeded from (seed, stream, k).  Any span is assembled from whole blocks, so
the numbers do not depend on how the span is cut into chunks.
"""
from __future__ import annotations

import math

import torch

_MEL_BLOCK = 64        # mel frames per block
_SAMPLE_BLOCK = 9600   # audio samples per block
_MIX = 0x9E3779B97F4A7C15


def _gen(seed: int, stream: int, block: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + stream * 7919 + block * 104_729 + _MIX) % (2**63 - 1))
    return g


def _span(seed: int, stream: int, start: int, end: int, block: int, rows: int) -> torch.Tensor:
    """(rows, end-start) standard normal values for positions [start, end)."""
    if end <= start:
        return torch.zeros(rows, 0)
    first, last = start // block, (end - 1) // block
    parts = [torch.randn(block, rows, generator=_gen(seed, stream, b)).T for b in range(first, last + 1)]
    full = torch.cat(parts, dim=1)
    off = first * block
    return full[:, start - off:end - off].contiguous()


class PositionalNoise:
    """Noise of one utterance / stream, keyed by ``seed``."""

    def __init__(self, seed: int, n_mels: int = 80, harmonics: int = 9):
        self.seed, self.n_mels, self.harmonics = int(seed), n_mels, harmonics

    def mel(self, start: int, end: int) -> torch.Tensor:
        """Initial flow state for mel frames [start, end) (frame 0 = first prompt frame): (n_mels, n)."""
        return _span(self.seed, 1, start, end, _MEL_BLOCK, self.n_mels)

    def source_noise(self, start: int, end: int) -> torch.Tensor:
        """Per-sample source noise for audio samples [start, end): (harmonics, n)."""
        return _span(self.seed, 2, start, end, _SAMPLE_BLOCK, self.harmonics)

    def source_phase(self) -> torch.Tensor:
        """Start phase per harmonic in [-pi, pi): (harmonics, 1)."""
        g = _gen(self.seed, 3, 0)
        return torch.rand(self.harmonics, 1, generator=g) * (2 * math.pi) - math.pi
