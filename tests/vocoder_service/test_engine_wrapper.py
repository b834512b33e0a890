"""The async vocoder engine over a synchronous backend: order, batching hook, cancel and close."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from vocoder_service.engine import SessionClosedError, UnknownVoiceError, VocoderEngine


class Backend:
    def __init__(self, voice, seed, log):
        self.seed, self.log, self.closed = seed, log, False

    def push(self, ids):
        self.log.append((self.seed, list(ids)))
        return np.full(960 * len(ids), self.seed, np.float32)

    def finish(self):
        return np.zeros(0, np.float32)

    def close(self):
        self.closed = True


def test_sessions_keep_order_and_release():
    log = []
    engine = VocoderEngine(lambda v, s: Backend(v, s, log), ["default", "b"])

    async def one(seed):
        s = engine.open_session("", seed=seed)
        outs = await asyncio.gather(*(s.push([seed * 100 + i]) for i in range(5)))
        outs.append(await s.finish())
        s.close()
        s.close()  # idempotent
        return np.concatenate(outs)

    async def main():
        return await asyncio.gather(*(one(k) for k in range(1, 4)))

    results = asyncio.run(main())
    for k, audio in zip(range(1, 4), results):
        assert audio.size == 5 * 960 and (audio == k).all()
        assert [ids[0] for seed, ids in log if seed == k] == [k * 100 + i for i in range(5)]
    assert engine.stats()["active_sessions"] == 0
    with pytest.raises(UnknownVoiceError, match="default, b"):
        engine.open_session("zzz")
    with pytest.raises(ValueError, match="6561"):
        asyncio.run(engine.open_session("b").push([6561]))
    engine.shutdown()


def test_batched_step_and_cancel_and_close():
    log, batches = [], []
    gate = threading.Event()

    def step_batch(backends, token_lists):
        batches.append(len(backends))
        return [b.push(t) for b, t in zip(backends, token_lists)]

    def open_backend(v, s):
        gate.wait(5)
        return Backend(v, s, log)

    engine = VocoderEngine(open_backend, ["default"], step_batch=step_batch)

    async def main():
        sessions = [engine.open_session("default", seed=i) for i in range(3)]
        tasks = [asyncio.ensure_future(s.push([1, 2])) for s in sessions]
        await asyncio.sleep(0.05)
        gate.set()
        outs = await asyncio.gather(*tasks)
        assert all(o.size == 2 * 960 for o in outs)
        # cancel a waiting push, then close: the session is freed, later calls fail clearly
        t = asyncio.ensure_future(sessions[0].push([3]))
        t.cancel()
        sessions[0].close()
        with pytest.raises(SessionClosedError):
            await sessions[0].push([4])
        for s in sessions[1:]:
            s.close()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert 3 in batches
    assert engine.stats()["active_sessions"] == 0
    engine.shutdown()
