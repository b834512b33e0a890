"""Positional noise: a pure function of (seed, stream, row, position), batched, standard normal."""
from __future__ import annotations

import math

import pytest
import torch

from vocoder_service.s3gen.noise import (MEL_STREAM, SOURCE_STREAM, PositionalNoise, hashed_normal,
                                         stream_keys)


def test_spans_do_not_depend_on_how_they_are_cut():
    n = PositionalNoise(1234)
    whole = n.mel(0, 300)
    parts = torch.cat([n.mel(0, 37), n.mel(37, 38), n.mel(38, 300)], dim=1)
    assert whole.shape == (80, 300)
    assert torch.equal(whole, parts)
    src = n.source_noise(5000, 25000)
    assert torch.equal(src[:, 100:200], n.source_noise(5100, 5200))
    assert n.mel(10, 10).shape == (80, 0)


def test_batch_rows_equal_single_rows():
    seeds = torch.tensor([0, 7, 2**40 + 3, 2**62])
    starts = torch.tensor([0, 500, 12, 99_999_000])
    batch = hashed_normal(stream_keys(seeds, SOURCE_STREAM), starts, 64, 9)
    for b in range(4):
        one = PositionalNoise(int(seeds[b]), harmonics=9).source_noise(int(starts[b]), int(starts[b]) + 64)
        assert torch.equal(batch[b], one)


def test_standard_normal_and_uncorrelated():
    x = PositionalNoise(99).mel(0, 20_000)  # 1.6 M values
    assert abs(x.mean().item()) < 5e-3
    assert abs(x.std().item() - 1) < 5e-3
    assert x.isfinite().all()
    # fraction beyond 3 sigma ~ 0.27 %
    assert abs((x.abs() > 3).float().mean().item() - 0.0027) < 5e-4
    flat = x.T.reshape(-1)
    for lag in (1, 80, 81):  # next row, next frame, next frame and row
        c = torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1].item()
        assert abs(c) < 5e-3, (lag, c)


def test_seeds_and_streams_differ():
    a = PositionalNoise(5).mel(0, 100)
    assert not torch.allclose(a, PositionalNoise(6).mel(0, 100))
    assert not torch.allclose(a, PositionalNoise(5 + 2**32).mel(0, 100))  # the high half counts too
    k = stream_keys(torch.tensor([5]), MEL_STREAM)
    assert not torch.equal(k, stream_keys(torch.tensor([5]), SOURCE_STREAM))


def test_source_phase_range_and_bad_seed():
    ph = PositionalNoise(3).source_phase()
    assert ph.shape == (9, 1)
    assert (ph >= -math.pi).all() and (ph < math.pi).all()
    assert ph.unique().numel() == 9
    with pytest.raises(ValueError, match="seed"):
        PositionalNoise(-1)
