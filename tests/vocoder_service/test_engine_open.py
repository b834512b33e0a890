"""Early backend open (issue 6, time to first audio): ``VocoderSession.prepare()`` opens the backend on the
worker ahead of the first push; errors reach the first push; a session closed first leaks nothing; a
pending open never delays a push; opens go first in a step and are counted in ``open_ms``."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from vocoder_service.engine import VocoderEngine


class Rig:
    """An engine over a fake backend; logs opens / pushes / closes with the worker thread's name;
    ``gate`` holds the worker inside a backend call (``hold`` names the call: "open" or "push")."""

    def __init__(self, fail_open: bool = False, **kw):
        self.events: list[tuple] = []
        self.gate = threading.Event()
        self.gate.set()
        self.hold = "push"
        self.entered = threading.Event()
        self.fail_open = fail_open
        self.opens = 0
        self.closed: list[int] = []
        self.engine = VocoderEngine(self._open, ["default"], step_batch=self._step, **kw)

    def _wait(self, what: str) -> None:
        if self.hold == what:
            self.entered.set()
            self.gate.wait(10)

    def _open(self, voice, seed):
        self.opens += 1
        self.events.append(("open", seed, threading.current_thread().name))
        self._wait("open")
        if self.fail_open:
            raise RuntimeError(f"cannot open voice {voice!r}")
        rig = self

        class Backend:
            def push(self, ids):
                return rig._step([self], [ids])[0]

            def finish(self):
                return np.zeros(0, np.float32)

            def tokens_needed(self):
                return 3

            def close(self):
                rig.closed.append(seed)

        b = Backend()
        b.seed = seed
        return b

    def _step(self, backends, lists):
        self.events.append(("push", tuple(b.seed for b in backends)))
        self._wait("push")
        return [np.ones(960 * len(ids), np.float32) for ids in lists]

    async def held(self, what: str, start):
        """Run ``start()`` (a coroutine factory) until the worker waits in a ``what`` call."""
        self.hold, self.entered = what, threading.Event()
        self.gate.clear()
        fut = asyncio.ensure_future(start())
        while not self.entered.is_set():
            await asyncio.sleep(0.001)
        return fut

    def release(self) -> None:
        self.gate.set()


async def _idle(engine: VocoderEngine, steps: int) -> None:
    """Wait (bounded) until the worker has run ``steps`` steps and nothing is queued."""
    for _ in range(2000):
        if engine.stats()["worker_steps"] >= steps and not engine._pending:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"the engine did not reach {steps} steps: {engine.stats()['worker_steps']}")


def test_prepare_opens_on_the_worker_before_the_first_push():
    rig = Rig()

    async def main():
        s = rig.engine.open_session("default", seed=1)
        s.prepare()
        s.prepare()  # idempotent
        await _idle(rig.engine, 1)
        assert s._backend is not None and rig.opens == 1
        # the backend told the session it needs 3 tokens: smaller pushes stay on the event loop
        assert (await s.push([1])).size == 0 and (await s.push([2])).size == 0
        audio = await s.push([3])
        rest = await s.finish()
        s.close()
        await _idle(rig.engine, 4)
        return audio, rest

    audio, rest = asyncio.run(main())
    st = rig.engine.stats()
    rig.engine.shutdown()
    assert audio.size == 3 * 960 and rest.size == 0
    assert rig.events[0][0] == "open" and rig.events[0][2].startswith("vocoder")  # on the worker thread
    assert [e[0] for e in rig.events] == ["open", "push"]  # the push's step opened nothing
    assert st["open_ms"]["n"] == 1 and st["early_opens"] == 1
    assert st["queue_wait_ms"]["n"] == 2  # the push and the finish, not the open
    assert rig.closed == [1] and st["active_sessions"] == 0


def test_a_failed_early_open_fails_the_first_push_with_its_error():
    rig = Rig(fail_open=True)

    async def main():
        s = rig.engine.open_session("default", seed=2)
        s.prepare()
        await _idle(rig.engine, 1)
        with pytest.raises(RuntimeError, match="cannot open voice 'default'"):
            await s.push([1, 2, 3])
        with pytest.raises(RuntimeError, match="cannot open voice"):
            await s.finish()
        s.close()

    asyncio.run(main())
    st = rig.engine.stats()
    rig.engine.shutdown()
    assert rig.opens == 1  # not tried again by every call
    assert st["open_ms"]["n"] == 1 and st["active_sessions"] == 0


def test_close_before_the_first_push_releases_the_opened_backend():
    rig = Rig()

    async def main():
        s = rig.engine.open_session("default", seed=3)
        s.prepare()
        await _idle(rig.engine, 1)
        s.close()
        await _idle(rig.engine, 2)

    asyncio.run(main())
    rig.engine.shutdown()
    assert rig.opens == 1 and rig.closed == [3]


def test_close_while_the_open_runs_releases_it_after_the_open():
    rig = Rig()

    async def main():
        s = rig.engine.open_session("default", seed=4)
        await rig.held("open", lambda: asyncio.sleep(0, s.prepare()))
        s.close()  # the open is running on the worker
        rig.release()
        await _idle(rig.engine, 2)

    asyncio.run(main())
    st = rig.engine.stats()
    rig.engine.shutdown()
    assert rig.opens == 1 and rig.closed == [4] and st["active_sessions"] == 0


def test_an_open_still_queued_is_dropped_by_close_or_folded_into_the_first_push():
    rig = Rig()

    async def main():
        other = rig.engine.open_session("default", seed=9)
        busy = await rig.held("push", lambda: other.push([1, 2, 3]))  # the worker is in a step
        gone = rig.engine.open_session("default", seed=5)
        gone.prepare()
        gone.close()  # closed while its open waits: it is never opened
        s = rig.engine.open_session("default", seed=6)
        s.prepare()
        first = asyncio.ensure_future(s.push([1, 2, 3]))  # queued behind its own pending open
        await asyncio.sleep(0.01)
        rig.release()
        out = await first
        await busy
        for x in (s, other):
            x.close()
        await _idle(rig.engine, 3)
        return out

    out = asyncio.run(main())
    st = rig.engine.stats()
    rig.engine.shutdown()
    assert out.size == 3 * 960
    # one step after the held one: session 6's push opened its backend itself (no open-only step first)
    assert rig.events == [("open", 9, rig.events[0][2]), ("push", (9,)), ("open", 6, rig.events[2][2]), ("push", (6,))]
    assert st["early_opens"] == 0 and st["open_ms"]["n"] == 2
    assert 5 not in rig.closed and sorted(rig.closed) == [6, 9] and st["active_sessions"] == 0


@pytest.mark.parametrize("urgent_slack_s", [0.5, 0.0])
def test_opens_go_first_and_take_no_push_row(urgent_slack_s):
    """max_batch 1: the step after the held one runs session 8's open AND session 10's first push."""
    rig = Rig(max_batch=1, urgent_slack_s=urgent_slack_s)

    async def main():
        a = rig.engine.open_session("default", seed=7)
        await a.push([1, 2, 3])
        busy = await rig.held("push", lambda: a.push([4, 5, 6]))
        c = rig.engine.open_session("default", seed=10)
        first = asyncio.ensure_future(c.push([1, 2, 3]))
        await asyncio.sleep(0.01)
        b = rig.engine.open_session("default", seed=8)
        b.prepare()
        await asyncio.sleep(0.01)
        steps = rig.engine.stats()["worker_steps"]
        rig.release()
        await busy
        await first
        await _idle(rig.engine, steps + 2)
        after = rig.engine.stats()["worker_steps"]
        for x in (a, b, c):
            x.close()
        await _idle(rig.engine, after + 1)
        return steps, after

    steps, after = asyncio.run(main())
    st = rig.engine.stats()
    rig.engine.shutdown()
    kinds = [e[:2] for e in rig.events]
    assert kinds == [("open", 7), ("push", (7,)), ("push", (7,)), ("open", 8), ("open", 10), ("push", (10,))]
    assert after == steps + 2  # the held step, then one step with the open and the push
    assert st["early_opens"] == 1 and st["open_ms"]["n"] == 3
    assert sorted(rig.closed) == [7, 8, 10]
