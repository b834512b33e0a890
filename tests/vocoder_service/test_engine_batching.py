"""Batched vocoding: several sessions' chunks in one stream_step give each session its solo audio."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from vocoder_service.engine.loader import s3gen_engine, step_batch_s3gen


@pytest.fixture(scope="module")
def tiny_vocoder(demo_tiny_dir):
    from vocoder_service.s3gen.loading import load_vocoder

    return load_vocoder(demo_tiny_dir, device="cpu")


def _run(engine, token_streams, seeds):
    """All sessions push their chunks concurrently; returns each session's whole audio."""

    async def one(tokens, seed):
        s = engine.open_session("default", seed=seed)
        out = [await s.push(tokens[i:i + 7]) for i in range(0, len(tokens), 7)]
        out.append(await s.finish())
        s.close()
        return np.concatenate(out)

    async def main():
        return await asyncio.gather(*(one(t, s) for t, s in zip(token_streams, seeds)))

    return asyncio.run(main())


@pytest.mark.skipif(step_batch_s3gen() is None, reason="vocoder_service.s3gen.streaming has no push_batch yet")
def test_batched_sessions_equal_solo_sessions(tiny_vocoder):
    model, voices = tiny_vocoder
    rng = np.random.default_rng(0)
    streams = [rng.integers(0, 6561, 80).tolist() for _ in range(3)]
    seeds = [1, 2, 3]
    batched = s3gen_engine(model, voices, batched=True)
    solo = s3gen_engine(model, voices, batched=False)
    got = _run(batched, streams, seeds)
    want = [_run(solo, [t], [s])[0] for t, s in zip(streams, seeds)]
    assert batched.stats()["batched_steps"] > 0  # the batch path really ran
    for g, w, t in zip(got, want, streams):
        assert g.shape == w.shape == (960 * len(t),)
        np.testing.assert_allclose(g, w, atol=2e-4)
    assert batched.stats()["active_sessions"] == 0
    batched.shutdown()
    solo.shutdown()
