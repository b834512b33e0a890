"""VocoderEngine.stats(): worker steps, rows per batch, queue waits and idle time counted right (issue 6)."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from vocoder_service.engine import VocoderEngine
from vocoder_service.engine.step_stats import Recent

STEP_S = 0.03


class Backend:
    """Every push returns 960 samples a token; finish returns nothing."""

    def __init__(self, voice, seed):
        self.closed = False

    def push(self, ids):
        time.sleep(STEP_S)
        return np.zeros(960 * len(ids), np.float32)

    def finish(self):
        time.sleep(STEP_S)
        return np.zeros(0, np.float32)

    def close(self):
        self.closed = True


def _engine(**kw) -> VocoderEngine:
    def step_batch(sessions, token_lists):
        time.sleep(STEP_S)
        return [np.zeros(960 * len(t), np.float32) for t in token_lists]

    def finish_batch(sessions):
        time.sleep(STEP_S)
        return [np.zeros(0, np.float32) for _ in sessions]

    return VocoderEngine(Backend, ["default"], step_batch=step_batch, finish_batch=finish_batch,
                         hold_pushes=False, **kw)


def test_rows_steps_and_waits_are_counted():
    engine = _engine()

    async def main():
        a, b, c = (engine.open_session("default", seed=i) for i in range(3))
        await a.push([1, 2])                                          # step 1: 1 push row (+ 1 open)
        await asyncio.gather(a.push([3]), b.push([4, 5, 6]), c.push([7]))  # step 2: 3 push rows (+ 2 opens)
        # step 3: b's push runs; c's push is queued ~10 ms later and must wait for step 3 to end
        slow = asyncio.ensure_future(b.push([8]))
        await asyncio.sleep(0.01)
        await c.push([9])
        await slow
        await asyncio.gather(a.finish(), b.finish(), c.finish())      # a finish batch of 3 rows
        for s in (a, b, c):
            s.close()
        await asyncio.sleep(0.05)  # the close-only step runs

    asyncio.run(main())
    st = engine.stats()
    engine.shutdown()
    assert st["active_sessions"] == 0 and st["opened_sessions"] == 3
    assert st["tokens"] == 9
    assert st["push_rows"]["n"] == 4 and st["push_rows"]["sum"] == 1 + 3 + 1 + 1  # steps 1, 2, 3, 4
    assert st["push_tokens"]["n"] == 6 and st["push_tokens"]["sum"] == 9
    assert st["finish_rows"]["n"] == 1 and st["finish_rows"]["sum"] == 3
    assert st["open_ms"]["n"] == 3
    # 4 push steps + 1 finish step + at least one close-only step
    assert st["worker_steps"] == st["step_ms"]["n"] >= 6
    assert st["push_ms"]["n"] == 4 and st["push_ms"]["p50"] >= STEP_S * 1000 * 0.9
    assert st["busy_s"] >= 5 * STEP_S * 0.9
    assert abs(st["busy_s"] - st["step_ms"]["sum"] / 1000) < 1e-3
    # one wait per push / finish call; c's second push waited for b's step (~20 ms at least)
    assert st["queue_wait_ms"]["n"] == 6 + 3
    assert st["queue_wait_ms"]["max"] >= (STEP_S - 0.01) * 1000 * 0.8
    # gaps between steps: one fewer than the steps; hand-off <= idle; the scheduler resumed after each step
    assert st["idle_ms"]["n"] == st["worker_steps"] - 1
    assert 0 <= st["handoff_ms"]["sum"] <= st["idle_ms"]["sum"]
    assert st["resume_ms"]["n"] == st["worker_steps"]
    assert st["t"] > 1.7e9


def test_unbatched_backend_counts_rows_too():
    engine = VocoderEngine(Backend, ["default"], hold_pushes=False)

    async def main():
        a, b = engine.open_session("default"), engine.open_session("default")
        await asyncio.gather(a.push([1]), b.push([2, 3]))
        await asyncio.gather(a.finish(), b.finish())
        a.close()
        b.close()

    asyncio.run(main())
    st = engine.stats()
    engine.shutdown()
    assert st["push_rows"]["n"] == 1 and st["push_rows"]["sum"] == 2
    assert st["finish_rows"]["n"] == 1 and st["finish_rows"]["sum"] == 2
    assert st["push_ms"]["p50"] >= 2 * STEP_S * 1000 * 0.9  # two one-by-one pushes in that step


def test_recent_window_keeps_totals_and_drops_old_percentiles():
    now = [100.0]
    rec = Recent(window_s=10.0, max_items=3, clock=lambda: now[0])
    assert rec.summary() == {"n": 0, "sum": 0.0, "window_n": 0}
    for v in (5.0, 1.0, 3.0):
        rec.add(v)
    s = rec.summary()
    assert s["n"] == 3 and s["sum"] == 9.0 and s["window_n"] == 3
    assert s["p50"] == 3.0 and s["p99"] == 5.0 and s["max"] == 5.0
    rec.add(2.0)  # bounded: the oldest value (5.0) leaves the window, not the totals
    s = rec.summary(scale=10)
    assert s["n"] == 4 and s["sum"] == 110.0 and s["window_n"] == 3 and s["max"] == 30.0
    now[0] += 11  # older than the window: no percentiles left
    s = rec.summary()
    assert s == {"n": 4, "sum": 11.0, "window_n": 0}


def test_stats_window_setter_reaches_every_histogram():
    engine = _engine(stats_window_s=3.0)
    assert engine.stats_window_s == 3.0
    engine.stats_window_s = 7.5
    assert all(rec.window_s == 7.5 for rec in engine._timing.values())
    engine.shutdown()
