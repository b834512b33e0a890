"""Streaming sessions: length, closeness to offline, boundaries, bad input, isolation, batching.

Thresholds were set from measurement (docs/ARCHITECTURE.md, "Vocoder streaming"): on the tiny
model, 250 random tokens pushed 7 at a time with the default StreamConfig, seed 11, gave a
log-mel distance to offline of 0.0127 (0.283 between two offline runs of different seeds), a
largest jump at chunk boundaries of 0.0138 against 0.188 inside chunks (offline has 0.0107 at the
same positions). Without the held-back cross-fade the boundary jump was 0.076. Thresholds leave
~2-3x headroom and still fail without the cross-fade.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.vocoder_service.helpers import boundary_jumps, log_mel_distance
from vocoder_service.s3gen.streaming import (SessionClosed, SessionFinished, StreamConfig, StreamingSession,
                                             finish_batch, new_state, push_batch, stream_step)

T = 250
SEED = 11


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 6561, (T,), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def offline(tiny_model, tiny_voice, tokens) -> torch.Tensor:
    return tiny_model.synthesize(tokens, tiny_voice, seed=SEED)


def stream(model, voice, tokens, sizes, seed=SEED, config=None) -> tuple[torch.Tensor, list[int]]:
    s = StreamingSession(model, voice, seed=seed, config=config)
    outs, i = [], 0
    for k in itertools.cycle(sizes):
        if i >= tokens.numel():
            break
        outs.append(s.push(tokens[i:i + k]))
        i += k
    outs.append(s.finish())
    s.close()
    lens = [o.numel() for o in outs]
    assert all(o.dtype == torch.float32 and o.dim() == 1 for o in outs)
    return torch.cat(outs), lens


def test_stream_matches_offline(tiny_model, tiny_voice, tokens, offline):
    wav, lens = stream(tiny_model, tiny_voice, tokens, [7])
    assert wav.numel() == offline.numel() == T * 960
    assert lens[0] > 0  # 7 tokens >= first_chunk_tokens (4) + 3 look-ahead tokens
    other_seed = tiny_model.synthesize(tokens, tiny_voice, seed=SEED + 1)
    dist, scale = log_mel_distance(wav, offline), log_mel_distance(other_seed, offline)
    assert dist < 0.04, (dist, scale)
    assert dist < 0.15 * scale, (dist, scale)
    bounds = sorted({b for b in itertools.accumulate(lens) if 0 < b < wav.numel()})
    at, inside = boundary_jumps(wav, bounds)
    offline_at, _ = boundary_jumps(offline, bounds)
    assert at < 0.25 * inside, (at, inside)
    assert at < 3 * max(offline_at, 0.01), (at, offline_at)


def test_stream_without_holdback_is_worse(tiny_model, tiny_voice, tokens):
    """The held-back, cross-faded audio matters: without it the boundary jumps grow."""
    jumps = []
    for cfg in (StreamConfig(), StreamConfig(holdback_frames=0)):
        wav, lens = stream(tiny_model, tiny_voice, tokens[:120], [7], config=cfg)
        bounds = sorted({b for b in itertools.accumulate(lens) if 0 < b < wav.numel()})
        jumps.append(boundary_jumps(wav, bounds)[0])
    assert jumps[1] > 2 * jumps[0], jumps


def test_first_audio_after_first_chunk_plus_lookahead(tiny_model, tiny_voice, tokens):
    cfg = StreamConfig()
    need = cfg.first_chunk_tokens + tiny_model.cfg.pre_lookahead
    s = StreamingSession(tiny_model, tiny_voice, config=cfg)
    assert s.push(tokens[:need - 1]).numel() == 0
    first = s.push(tokens[need - 1:need])
    assert first.numel() == (2 * cfg.first_chunk_tokens - cfg.holdback_frames) * 480
    s.close()


def test_chunking_does_not_change_length(tiny_model, tiny_voice, tokens):
    for sizes in ([1], [3, 50], [250]):
        wav, _ = stream(tiny_model, tiny_voice, tokens[:40], sizes)
        assert wav.numel() == 40 * 960


def test_bad_input(tiny_model, tiny_voice):
    s = StreamingSession(tiny_model, tiny_voice)
    with pytest.raises(ValueError, match="6561"):
        s.push([1, 2, 6561])
    with pytest.raises(ValueError, match="-1"):
        s.push([-1])
    with pytest.raises(ValueError, match="empty"):
        s.push([])
    with pytest.raises(TypeError, match="integers"):
        s.push(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="integers"):
        s.push(np.array([0.5]))
    with pytest.raises(ValueError, match="shape"):
        s.push(torch.zeros(2, 3, dtype=torch.long))
    assert s.push([5, 6]).numel() == 0  # still usable after rejected input
    assert s.finish().numel() == 2 * 960
    with pytest.raises(SessionFinished):
        s.push([1])
    with pytest.raises(SessionFinished):
        s.finish()
    s.close()
    s.close()
    with pytest.raises(SessionClosed):
        s.push([1])


def test_empty_stream(tiny_model, tiny_voice):
    s = StreamingSession(tiny_model, tiny_voice)
    assert s.finish().numel() == 0


def test_sessions_are_isolated(tiny_model, tiny_voice, tokens):
    """Interleaving two sessions gives each exactly what it gives alone."""
    alone_a, _ = stream(tiny_model, tiny_voice, tokens[:60], [13], seed=1)
    alone_b, _ = stream(tiny_model, tiny_voice, tokens[60:120], [13], seed=2)
    a, b = StreamingSession(tiny_model, tiny_voice, seed=1), StreamingSession(tiny_model, tiny_voice, seed=2)
    out_a, out_b = [], []
    for i in range(0, 60, 13):
        out_a.append(a.push(tokens[:60][i:i + 13]))
        out_b.append(b.push(tokens[60:120][i:i + 13]))
    out_b.append(b.finish())
    out_a.append(a.finish())
    torch.testing.assert_close(torch.cat(out_a), alone_a, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(out_b), alone_b, rtol=0, atol=0)


def test_batched_step_equals_single(tiny_model, tiny_voice, tokens):
    """stream_step on a batch of 2 states == two batch-1 steps (rows never mix)."""
    cfg = StreamConfig()
    la = tiny_model.cfg.pre_lookahead
    single, batched = [], [new_state(tiny_model, tiny_voice, 1), new_state(tiny_model, tiny_voice, 2)]
    singles = [new_state(tiny_model, tiny_voice, 1), new_state(tiny_model, tiny_voice, 2)]
    rows = [tokens[:40], tokens[100:140]]
    pos = 0
    for n in (cfg.first_chunk_tokens, cfg.chunk_tokens):
        chunk = torch.stack([r[pos:pos + n] for r in rows])
        ahead = torch.stack([r[pos + n:pos + n + la] for r in rows])
        for s, r in zip(singles + batched, rows + rows):
            s.tokens.extend(r[pos:pos + n + la].tolist() if not s.tokens else r[pos + la:pos + n + la].tolist())
        out_b = stream_step(tiny_model, batched, chunk, ahead, False, cfg)
        for i in range(2):
            out_s = stream_step(tiny_model, [singles[i]], chunk[i:i + 1], ahead[i:i + 1], False, cfg)[0]
            single.append(out_s)
            torch.testing.assert_close(out_b[i], out_s, rtol=1e-5, atol=1e-6)
        pos += n
    assert all(o.numel() > 0 for o in single)


def test_push_batch_equals_solo_pushes(tiny_model, tiny_voice, tokens):
    rows = [tokens[:50], tokens[50:100], tokens[100:150]]
    solo = [stream(tiny_model, tiny_voice, r, [9], seed=i)[0] for i, r in enumerate(rows)]
    sessions = [StreamingSession(tiny_model, tiny_voice, seed=i) for i in range(3)]
    outs = [[] for _ in rows]
    for i in range(0, 50, 9):
        for k, o in enumerate(push_batch(sessions, [r[i:i + 9] for r in rows])):
            outs[k].append(o)
    for k, s in enumerate(sessions):
        outs[k].append(s.finish())
        torch.testing.assert_close(torch.cat(outs[k]), solo[k], rtol=1e-4, atol=1e-5)
    fresh = [StreamingSession(tiny_model, tiny_voice) for _ in range(2)]
    with pytest.raises(ValueError, match="session 1"):
        push_batch(fresh, [[1, 2], [7000]])
    assert fresh[0].n_tokens == 0  # nothing was taken when one list was bad


def test_finish_batch_equals_solo_finishes(tiny_model, tiny_voice, tokens):
    # two streams end with the same remaining tokens (one batched final step), one with another count
    rows = [tokens[:61], tokens[61:122], tokens[122:185]]
    solo = [stream(tiny_model, tiny_voice, r, [61, 2], seed=i)[0] for i, r in enumerate(rows)]
    sessions = [StreamingSession(tiny_model, tiny_voice, seed=i) for i in range(3)]
    first = push_batch(sessions, [r[:61] for r in rows])
    last = push_batch([sessions[2]], [rows[2][61:]])[0]
    pending = [s._pending_tokens for s in sessions]
    assert pending[0] == pending[1] != pending[2]  # two final-step shapes: one batch of 2, one of 1
    ends = finish_batch(sessions)
    got = [torch.cat([first[0], ends[0]]), torch.cat([first[1], ends[1]]), torch.cat([first[2], last, ends[2]])]
    for g, w in zip(got, solo):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with pytest.raises(SessionFinished):
        finish_batch([sessions[0]])
    with pytest.raises(ValueError, match="twice"):
        fresh = StreamingSession(tiny_model, tiny_voice)
        finish_batch([fresh, fresh])


def test_push_batch_mixes_stream_phases_in_one_flow_batch(tiny_model, tiny_voice, tokens):
    # session 0 is 40 tokens ahead: its steps (context, chunk size) differ from session 1's, yet the
    # padded flow runs them together and each gets its solo audio
    a, b = tokens[:120], tokens[120:200]
    solo_a = stream(tiny_model, tiny_voice, a, [40, 10], seed=0)[0]
    solo_b = stream(tiny_model, tiny_voice, b, [10], seed=1)[0]
    sa, sb = StreamingSession(tiny_model, tiny_voice, seed=0), StreamingSession(tiny_model, tiny_voice, seed=1)
    out_a, out_b = [sa.push(a[:40])], []
    for i in range(0, 80, 10):
        x, y = push_batch([sa, sb], [a[40 + i:50 + i], b[i:i + 10]])
        out_a.append(x)
        out_b.append(y)
    ends = finish_batch([sa, sb])
    torch.testing.assert_close(torch.cat(out_a + [ends[0]]), solo_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(out_b + [ends[1]]), solo_b, rtol=1e-4, atol=1e-5)


def test_exact_windows_and_host_noise_give_the_same_audio(tiny_model, tiny_voice, tokens):
    # the tuning switches change how a step is computed, never what it computes
    ref = stream(tiny_model, tiny_voice, tokens[:90], [9], seed=4)[0]
    for cfg in (StreamConfig(pad_windows=False), StreamConfig(noise_on_host=True)):
        got = stream(tiny_model, tiny_voice, tokens[:90], [9], seed=4, config=cfg)[0]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
