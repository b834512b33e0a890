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


def test_finishes_batch_and_max_batch_caps_a_step():
    log, finish_calls, push_calls = [], [], []
    gate = threading.Event()

    def step_batch(backends, token_lists):
        push_calls.append(len(backends))
        return [b.push(t) for b, t in zip(backends, token_lists)]

    def finish_batch(backends):
        finish_calls.append(sorted(b.seed for b in backends))
        return [np.full(5, b.seed, np.float32) for b in backends]

    class Ending(Backend):
        def finish(self):  # a finish that runs alone (a batch of one) goes through the backend itself
            return np.full(5, self.seed, np.float32)

    def open_backend(v, s):
        gate.wait(5)
        return Ending(v, s, log)

    engine = VocoderEngine(open_backend, ["default"], step_batch=step_batch, finish_batch=finish_batch, max_batch=2)

    async def main():
        sessions = [engine.open_session("default", seed=i) for i in range(3)]
        pushes = [asyncio.ensure_future(s.push([1])) for s in sessions]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*pushes)
        ends = await asyncio.gather(*(s.finish() for s in sessions))
        for s in sessions:
            s.close()
        return ends

    ends = asyncio.run(main())
    assert [e.tolist() for e in ends] == [[i] * 5 for i in range(3)]  # each session got its own audio
    assert max(push_calls) == 2  # a step takes at most max_batch calls (3 pushes were waiting)
    assert [2] == [len(c) for c in finish_calls if len(c) > 1]  # two finishes ran as one batch (cap 2)
    assert engine.stats()["active_sessions"] == 0
    with pytest.raises(ValueError, match="max_batch"):
        VocoderEngine(open_backend, ["default"], max_batch=0)
    engine.shutdown()


def test_pushes_below_tokens_needed_stay_with_the_session():
    log = []

    class Chunky(Backend):
        """Audio only in whole chunks of 4 tokens; says how many more it needs."""

        def __init__(self, *a):
            super().__init__(*a)
            self.pending = 0

        def push(self, ids):
            self.log.append((self.seed, list(ids)))
            self.pending += len(ids)
            done, self.pending = self.pending // 4 * 4, self.pending % 4
            return np.full(960 * done, self.seed, np.float32)

        def finish(self):
            done, self.pending = self.pending, 0
            return np.full(960 * done, self.seed, np.float32)

        def tokens_needed(self):
            return 4 - self.pending

    engine = VocoderEngine(lambda v, s: Chunky(v, s, log), ["default"], hold_pushes=True)

    async def main():
        s = engine.open_session("default", seed=1)
        outs = [await s.push([t]) for t in range(10)]
        outs.append(await s.finish())
        s.close()
        return outs

    outs = asyncio.run(main())
    assert sum(o.size for o in outs) == 10 * 960  # every token's audio, none lost or doubled
    assert [len(ids) for _, ids in log] == [1, 3, 4, 2]  # first push (need unknown), then whole chunks, rest at finish
    assert [t for _, ids in log for t in ids] == list(range(10))  # in order
    assert engine.stats()["steps"] == 5  # 4 pushes + finish, not 10 pushes
    engine.shutdown()


def test_failed_batched_finish_fails_each_caller_and_frees_every_session():
    log = []

    def step_batch(backends, token_lists):
        return [b.push(t) for b, t in zip(backends, token_lists)]

    def finish_batch(backends):
        raise RuntimeError("device lost")

    gate = threading.Event()

    def open_backend(v, s):
        gate.wait(5)
        return Backend(v, s, log)

    engine = VocoderEngine(open_backend, ["default"], step_batch=step_batch, finish_batch=finish_batch)

    async def main():
        sessions = [engine.open_session("default", seed=i) for i in range(3)]
        pushes = [asyncio.ensure_future(s.push([1, 2])) for s in sessions]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*pushes)
        ends = await asyncio.gather(*(s.finish() for s in sessions), return_exceptions=True)
        for s in sessions:
            s.close()
        await asyncio.sleep(0.05)
        return ends

    ends = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "device lost" in str(e) for e in ends), ends
    assert engine.stats()["active_sessions"] == 0
    engine.shutdown()
