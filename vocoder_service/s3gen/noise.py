"""Reproducible noise addressed by absolute position, computed where it is used (CPU or GPU).

A streaming run must draw exactly the numbers an offline run of the same seed draws for a mel
frame or an audio sample, however the stream is cut into chunks, and a batched step must draw
every row's noise at once. So each value is a pure function of (seed, stream, row, position):
a counter-based hash (32-bit "lowbias32" mixes on int64 tensors) gives two uniforms, and
Box-Muller turns them into one standard normal. No generator state, no host work: a batch of
streams at different positions is one set of elementwise kernels on the device.

Streams: 1 = flow (initial mel state, ``n_mels`` rows per frame), 2 = harmonic-source noise
(``harmonics`` rows per sample), 3 = the source's start phases. The numbers are the same on every
device up to float32 rounding of ``log`` / ``cos`` / ``sqrt`` (bit-equal between runs on one device).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tts_common.hashing import MASK32, bits_to_unit, hash32

MEL_STREAM, SOURCE_STREAM, PHASE_STREAM = 1, 2, 3


def stream_keys(seeds: Tensor | int, stream: int) -> Tensor | int:
    """(B,) int64 seeds (any non-negative int64) -> (B,) 32-bit keys of one noise stream; a Python int
    seed gives its key as a Python int (the same mix, :func:`hash32` on ints)."""
    lo, hi = seeds & MASK32, (seeds >> 32) & MASK32
    return hash32(hash32(lo ^ 0x9E3779B9) ^ hash32(hi ^ (stream * 0x85EBCA6B & MASK32)))


def stream_key(seed: int, stream: int) -> int:
    """``stream_keys`` of one seed as a Python int, hashed on the host without tensors (a session's
    keys are constants: no device work, no host -> device copy to make them)."""
    return stream_keys(int(seed), stream)


def _position(start: int, device) -> Tensor:
    """(1,) int64 ``start`` on ``device`` (a fill kernel, not a pageable host -> device copy)."""
    return torch.full((1,), int(start), dtype=torch.int64, device=device)


def hashed_normal(keys: Tensor, start: Tensor, length: int, rows: int) -> Tensor:
    """Standard normals ``(B, rows, length)``: row ``b`` holds positions ``start[b] .. start[b]+length-1``.

    keys: (B,) from :func:`stream_keys`; start: (B,) int64 absolute positions (same device).
    Value (b, r, i) depends only on (keys[b], r, start[b] + i).
    """
    dev = keys.device
    pos = start.view(-1, 1, 1) + torch.arange(length, device=dev, dtype=torch.int64).view(1, 1, -1)
    counter = pos * rows + torch.arange(rows, device=dev, dtype=torch.int64).view(1, -1, 1)  # < 2**40
    k = keys.view(-1, 1, 1)
    a = hash32(hash32((counter & MASK32) ^ k) ^ (counter >> 32))
    b = hash32(a ^ 0x68E31DA4)
    return torch.sqrt(-2.0 * torch.log(bits_to_unit(a))) * torch.cos((2.0 * math.pi) * bits_to_unit(b))


def hashed_uniform_rows(keys: Tensor, rows: int) -> Tensor:
    """Uniforms in (0, 1): ``(B, rows)`` (position 0 of each row)."""
    counter = torch.arange(rows, device=keys.device, dtype=torch.int64).view(1, -1)
    return bits_to_unit(hash32(hash32(counter ^ keys.view(-1, 1))))


class PositionalNoise:
    """Noise of one utterance / stream, keyed by ``seed`` (a non-negative int < 2**63)."""

    def __init__(self, seed: int, n_mels: int = 80, harmonics: int = 9):
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"noise seed must be in [0, 2**63), got {seed}")
        self.seed, self.n_mels, self.harmonics = int(seed), n_mels, harmonics

    def key(self, stream: int) -> int:
        """This seed's 32-bit key of one noise stream, as a Python int (hashed once, on the host,
        in plain Python: equal to ``stream_keys`` of this seed)."""
        cache = self.__dict__.setdefault("_key_cache", {})
        if stream not in cache:
            cache[stream] = stream_key(self.seed, stream)
        return cache[stream]

    def _keys(self, stream: int, device) -> Tensor:
        """(1,) int64 key of ``stream`` on ``device``: a fill from the host-hashed key (no host ->
        device copy, so no host sync on CUDA, and no hashing kernels)."""
        return torch.full((1,), self.key(stream), dtype=torch.int64, device=device)

    def mel(self, start: int, end: int, device="cpu") -> Tensor:
        """Initial flow state for mel frames [start, end) (frame 0 = first prompt frame): (n_mels, n)."""
        n = max(0, end - start)
        return hashed_normal(self._keys(MEL_STREAM, device), _position(start, device), n, self.n_mels)[0]

    def source_noise(self, start: int, end: int, device="cpu") -> Tensor:
        """Per-sample source noise for audio samples [start, end): (harmonics, n)."""
        n = max(0, end - start)
        return hashed_normal(self._keys(SOURCE_STREAM, device), _position(start, device), n, self.harmonics)[0]

    def source_phase(self, device="cpu") -> Tensor:
        """Start phase per harmonic in [-pi, pi): (harmonics, 1)."""
        u = hashed_uniform_rows(self._keys(PHASE_STREAM, device), self.harmonics)[0]
        return (u * (2 * math.pi) - math.pi).view(-1, 1)
