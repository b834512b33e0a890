"""Deadline-aware vocoder steps (issue 6): urgent calls first, per-session order, no starvation, FIFO when off.

A fake backend logs which sessions each step ran; a gate holds the worker inside one step while the
test queues calls, so the next step's choice is deterministic. Time is an injected clock: the tests
move it (by hand, or by each step), nothing here depends on speed.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from tts_common.config import ConfigError, load_config
from vocoder_service.config import VocoderServiceConfig
from vocoder_service.engine import VocoderEngine
from vocoder_service.engine.loader import engine_scheduling

TOKEN_S = 960 / 24_000  # seconds of audio per token


class Backend:
    """Session ``seed``: every push returns 960 samples a token; finish returns nothing."""

    def __init__(self, rig: "Rig", seed: int):
        self.rig, self.seed = rig, seed
        self.tokens: list[int] = []

    def push(self, ids):
        return self.rig.step([self], [ids])[0]

    def finish(self):
        return self.rig.finish([self])[0]

    def close(self):
        pass


class Rig:
    """The engine under test with its fake backend, step log, gate and clock."""

    def __init__(self, step_s: float = 0.0, fail: int | None = None, **kw):
        self.now = 0.0
        self.step_s = step_s  # the clock moves this much per step
        self.fail = fail  # a step with this session raises
        self.log: list[tuple[int, ...]] = []  # sessions (seeds) of each push / finish step
        self.gate = threading.Event()
        self.gate.set()
        self.in_step = threading.Event()
        self.backends: dict[int, Backend] = {}
        self.engine = VocoderEngine(self._open, ["default"], step_batch=self.step,
                                    finish_batch=self.finish, hold_pushes=False, clock=lambda: self.now, **kw)

    def _open(self, voice, seed):
        self.backends[seed] = Backend(self, seed)
        return self.backends[seed]

    def step(self, backends, lists):
        self.in_step.set()
        self.gate.wait(10)
        self.log.append(tuple(b.seed for b in backends))
        self.now += self.step_s
        if self.fail in self.log[-1]:
            raise RuntimeError("backend failed")
        for b, ids in zip(backends, lists):
            b.tokens.extend(ids)
        return [np.zeros(960 * len(ids), np.float32) for ids in lists]

    def finish(self, backends):
        self.log.append(tuple(b.seed for b in backends))
        self.now += self.step_s
        return [np.zeros(0, np.float32) for _ in backends]

    async def hold_worker(self, seed: int = 99) -> asyncio.Future:
        """Start a push of session ``seed`` that keeps the worker in its step until ``release()``."""
        self.gate.clear()
        self.in_step.clear()
        s = self.engine.open_session("default", seed=seed)

        async def run():
            try:
                return await s.push([0])
            finally:
                s.close()

        fut = asyncio.ensure_future(run())
        while not self.in_step.is_set():
            await asyncio.sleep(0.001)
        return fut

    def release(self) -> None:
        self.gate.set()


async def _settle() -> None:
    """Let freshly created tasks hand their calls to the engine."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _buffered(rig: Rig, seeds, tokens: int = 50):
    """Sessions that each got ``tokens`` tokens of audio (2 s for 50) at the current clock."""
    sessions = [rig.engine.open_session("default", seed=i) for i in seeds]
    await asyncio.gather(*(s.push([1] * tokens) for s in sessions))
    return sessions


def test_urgent_first_chunk_overtakes_buffered_sessions():
    rig = Rig(urgent_slack_s=0.5, urgent_fill=0)

    async def main():
        old = await _buffered(rig, [1, 2, 3])  # 2 s of audio each: slack ~2 s, not urgent
        rig.now += 0.1
        gate = await rig.hold_worker()
        pushes = [asyncio.ensure_future(s.push([5])) for s in old]
        await _settle()
        new = rig.engine.open_session("default", seed=7)  # no audio yet: urgent
        first = asyncio.ensure_future(new.push([1, 2, 3, 4]))
        await _settle()
        rig.release()
        await asyncio.gather(gate, first, *pushes)
        for s in old + [new]:
            s.close()

    asyncio.run(main())
    st = rig.engine.stats()
    rig.engine.shutdown()
    assert rig.log == [(1, 2, 3), (99,), (7,), (1, 2, 3)]  # the new stream's first chunk ran alone, first
    # per step with pushes: urgent taken / pending left behind
    assert st["urgent_rows"]["n"] == 4 and st["urgent_rows"]["sum"] == 3 + 1 + 1 + 0
    assert st["deferred_rows"]["sum"] == 0 + 0 + 3 + 0
    assert st["aged_rows"] == 0 and st["active_sessions"] == 0


def test_fill_adds_the_least_buffered_non_urgent_calls():
    rig = Rig(urgent_slack_s=0.5, urgent_fill=1)

    async def main():
        a = (await _buffered(rig, [1], tokens=50))[0]  # 2 s
        b = (await _buffered(rig, [2], tokens=25))[0]  # 1 s: the least buffered non-urgent one
        gate = await rig.hold_worker()
        pa, pb = asyncio.ensure_future(a.push([5])), asyncio.ensure_future(b.push([5]))
        await _settle()
        new = rig.engine.open_session("default", seed=7)
        first = asyncio.ensure_future(new.push([1]))
        await _settle()
        rig.release()
        await asyncio.gather(gate, pa, pb, first)

    asyncio.run(main())
    rig.engine.shutdown()
    assert rig.log[-2:] == [(7, 2), (1,)]


def test_fifo_when_off():
    rig = Rig(urgent_slack_s=0.0)

    async def main():
        old = await _buffered(rig, [1, 2, 3])
        gate = await rig.hold_worker()
        pushes = [asyncio.ensure_future(s.push([5])) for s in old]
        await _settle()
        new = rig.engine.open_session("default", seed=7)
        first = asyncio.ensure_future(new.push([1]))
        await _settle()
        rig.release()
        await asyncio.gather(gate, first, *pushes)

    asyncio.run(main())
    st = rig.engine.stats()
    rig.engine.shutdown()
    assert rig.log == [(1, 2, 3), (99,), (1, 2, 3, 7)]
    assert st["urgent_rows"]["n"] == 0 and st["deferred_rows"]["n"] == 0


def test_each_session_keeps_its_order_when_deferred():
    rig = Rig(urgent_slack_s=0.5, urgent_fill=0)

    async def main():
        a = (await _buffered(rig, [1]))[0]
        gate = await rig.hold_worker()
        calls = [asyncio.ensure_future(a.push([k])) for k in (10, 11, 12)]
        await _settle()
        news = [rig.engine.open_session("default", seed=20 + i) for i in range(3)]
        firsts = [asyncio.ensure_future(s.push([1])) for s in news]
        await _settle()
        rig.release()
        await asyncio.gather(gate, *calls, *firsts)
        await a.finish()

    asyncio.run(main())
    rig.engine.shutdown()
    assert rig.log[2] == (20, 21, 22)  # the new streams first...
    assert rig.log[3:] == [(1,), (1,), (1,), (1,)]  # ...then a's pushes one per step, then its finish
    assert rig.backends[1].tokens == [1] * 50 + [10, 11, 12]  # in the order they were pushed


def _steps_until_served(rig: Rig, tokens: int = 50) -> int:
    """A session with audio buffered pushes once while three new streams keep arriving (each one push,
    always urgent); returns how many steps the worker had logged when that push was served."""

    async def main() -> int:
        b = (await _buffered(rig, [1], tokens=tokens))[0]
        done = asyncio.Event()
        seeds = iter(range(100, 1000))

        async def newcomers():
            while not done.is_set():
                s = rig.engine.open_session("default", seed=next(seeds))
                await s.push([1])
                s.close()

        gate = await rig.hold_worker()
        deferred = asyncio.ensure_future(b.push([5]))
        spawners = [asyncio.ensure_future(newcomers()) for _ in range(3)]
        await _settle()
        rig.release()
        await asyncio.wait_for(deferred, 10)
        n = len(rig.log)
        done.set()
        await asyncio.gather(gate, *spawners)
        return n

    return asyncio.run(main())


def test_a_deferred_session_is_served_while_new_urgent_work_keeps_arriving():
    # one call per step, every step moves the clock 0.3 s, three new streams always waiting: the buffered
    # session's slack (2 s) drains until it is the most urgent (no age cap in play: max_defer 100 s)
    rig = Rig(step_s=0.3, urgent_slack_s=0.5, urgent_fill=0, max_batch=1, max_defer_s=100.0)
    served_after = _steps_until_served(rig)
    rig.engine.shutdown()
    steps_waited = served_after - 2  # the buffered push, then the gate step
    assert 3 <= steps_waited <= 15  # overtaken at first (newcomers go first), then served
    assert all(len(step) == 1 for step in rig.log)


def test_age_cap_serves_a_call_whatever_its_slack():
    # urgent_slack_s 0.5 but the session has 40 s buffered: only the 1 s age cap lets it go
    rig = Rig(step_s=0.3, urgent_slack_s=0.5, urgent_fill=0, max_batch=1, max_defer_s=1.0)
    n = _steps_until_served(rig, tokens=1000)
    st = rig.engine.stats()
    rig.engine.shutdown()
    assert n - 2 <= 10  # ~1 s / 0.3 s per step, plus the steps already queued (by slack alone: ~130)
    assert st["aged_rows"] >= 1


def test_cancelled_deferred_call_and_failed_urgent_step_never_hang():
    rig = Rig(urgent_slack_s=0.5, urgent_fill=0, fail=7)

    async def main():
        a, b = await _buffered(rig, [1, 2])
        gate = await rig.hold_worker()
        gone = asyncio.ensure_future(a.push([5]))  # deferred, then its caller gives up
        kept = asyncio.ensure_future(b.push([6]))
        await _settle()
        new = rig.engine.open_session("default", seed=7)  # urgent, and its step fails
        bad = asyncio.ensure_future(new.push([1]))
        await _settle()
        gone.cancel()
        rig.release()
        await gate
        with pytest.raises(RuntimeError, match="backend failed"):
            await asyncio.wait_for(bad, 10)
        assert (await asyncio.wait_for(kept, 10)).size == 960
        with pytest.raises(asyncio.CancelledError):
            await gone
        for s in (a, b, new):
            s.close()
        await asyncio.sleep(0.01)  # the close-only step
        return a, b

    a, b = asyncio.run(main())
    st = rig.engine.stats()
    rig.engine.shutdown()
    assert rig.log[-2:] == [(7,), (2,)]  # a's cancelled push never ran
    assert st["active_sessions"] == 0
    assert a._backend is None and b._backend is None  # released


def test_playback_clock_rebuffers_after_running_dry():
    rig = Rig(urgent_slack_s=0.5)
    s = rig.engine.open_session("default")
    assert s._slack(5.0, waited=0.25) == -0.25  # no audio yet: minus the wait
    s._delivered(10.0, 2.0)
    assert s._slack(11.0, 0) == pytest.approx(1.0) and s.audio_s == 2.0 and s.first_audio_at == 10.0
    s._delivered(13.0, 1.0)  # ran dry at 12, re-buffered: plays to 14
    assert s._slack(13.5, 0) == pytest.approx(0.5) and s.audio_s == 3.0
    rig.engine.shutdown()


def test_settings_reach_the_engine_and_bad_values_are_refused():
    cfg = load_config(VocoderServiceConfig, [], {"TTS_MODEL_DIR": "m", "TTS_VOCODER_URGENT_SLACK_S": "0.8",
                                                 "TTS_VOCODER_URGENT_FILL": "2", "TTS_VOCODER_MAX_DEFER_MS": "1500"})
    assert engine_scheduling(cfg) == {"urgent_slack_s": 0.8, "urgent_fill": 2, "max_defer_s": 1.5}
    off = load_config(VocoderServiceConfig, ["--vocoder-urgent-slack-s", "0"], {"TTS_MODEL_DIR": "m"})
    assert engine_scheduling(off)["urgent_slack_s"] == 0.0
    with pytest.raises(ConfigError, match="TTS_VOCODER_URGENT_FILL"):
        load_config(VocoderServiceConfig, ["--vocoder-urgent-fill", "-1"], {"TTS_MODEL_DIR": "m"})
    with pytest.raises(ConfigError, match="TTS_VOCODER_MAX_DEFER_MS"):
        load_config(VocoderServiceConfig, ["--vocoder-max-defer-ms", "0"], {"TTS_MODEL_DIR": "m"})
    with pytest.raises(ValueError, match="urgent_slack_s"):
        VocoderEngine(lambda v, s: None, ["default"], urgent_slack_s=-1)
