"""The async vocoder engine: many streaming sessions, one compute thread, per-session order kept.

The S3Gen streaming session (``vocoder_service.s3gen.streaming.StreamingSession``) is synchronous:
``push(tokens) -> audio``, ``finish() -> audio``, ``close()``. This engine puts an asyncio face on it
(the contract in docs/ARCHITECTURE.md):

    session = engine.open_session("default", seed=0)
    audio = await session.push([1, 2, 3])   # float32 (N,) at 24 kHz, N may be 0
    audio = await session.finish()          # the rest; 960 samples per token in total
    session.close()                         # idempotent, frees the slot at once

Early open (issue 6, time to first audio): ``session.prepare()`` (the server calls it when a stream's
config arrives) queues the backend open to the worker at once, so it runs while the first tokens
are still being generated instead of inside the first push's step. Open calls go first in a step
(they are cheap), at most ``max_batch`` of them, and never delay a push: an open still pending when
its session's first push (or close) is queued is dropped, and that call opens the backend as it
would without ``prepare()``. A failed early open is kept and raised by the session's next
push / finish (the same error as without it); a session closed before its first push has its
backend released on the worker (after the open's step, if the open was running).

Scheduling: calls from all sessions go to one queue. A scheduler task builds a *step* from what is
pending (at most one call per session, so each session's calls run in the order they were made; at
most ``max_batch`` push / finish calls; closes always go, they cost nothing) and runs it on a single
worker thread (torch's intra-op threads do the parallel work). Which calls a step takes (issue 6,
time to first audio under load):

* ``urgent_slack_s`` = 0: FIFO, the first ``max_batch`` pending calls.
* ``urgent_slack_s`` > 0 (deadline-aware): each session keeps a playback clock, the moment its
  client's buffer runs dry if it plays in real time from its first audio (``play_end``: each
  non-empty result of ``d`` seconds delivered at ``t`` moves it to ``max(play_end, t) + d``, so a
  client that ran dry counts as re-buffering, not as owing that time forever). A call's *slack* is
  ``play_end - now`` (seconds of audio the client still has buffered), or, for a session with no
  audio yet, minus the time its call has waited (its first audio is the time to first audio: the
  oldest wait is the most urgent). A call is *urgent* when its slack is below ``urgent_slack_s`` or
  it has waited ``max_defer_s`` or more (age cap). With an urgent call pending, the step takes the
  urgent calls (aged first, oldest first; then lowest slack first; up to ``max_batch``) plus at most
  ``urgent_fill`` of the others (lowest slack first), so a new stream's first chunk runs in a short
  step instead of behind every buffered stream's next chunk; with none urgent it takes up to
  ``max_batch`` calls, lowest slack first. Nothing waits while the worker idles (a step always runs
  when calls are pending) and nothing starves: a deferred session's slack drains in real time until
  it is urgent itself, and ``max_defer_s`` caps any wait.

When the backend offers batched steps (``step_batch(sessions, token_lists) -> list[audio]``,
``finish_batch(sessions) -> list[audio]``) the pending pushes, and the pending finishes, of several
sessions each run as one batch; otherwise they run one after another. A caller that is cancelled
while its call waits is simply dropped; ``close()`` marks the session closed at once and the backend session is
released on the worker thread after any step it is in.

One engine serves one event loop at a time (the server's); the scheduler task starts on the loop of
the first call and moves to a new loop only when used from one (tests run several loops in turn).

Statistics (``stats()``; issue 6: where does a step's time go when the service is loaded). A *worker
step* is one trip to the worker thread (``_run_step``: at most one call per session; its pushes run
as one batch, its finishes as another). Besides the session counters, ``stats()`` holds, each as
``{"n", "sum", "window_n", "p50", "p99", "max"}`` (``step_stats.Recent``: n / sum over all time,
percentiles over the last ``stats_window_s`` seconds):

* ``step_ms`` — worker wall time of each worker step; ``push_ms`` / ``finish_ms`` — its push batch /
  finish batch part; ``open_ms`` — opening a backend session (its ``prepare()`` open, or else its
  first call); ``early_opens`` (a counter) — the opens that ran ahead of the session's first call.
* ``push_rows`` / ``finish_rows`` — sessions in a step's push / finish batch (steps with none add no
  value); ``push_tokens`` — tokens per pushed row.
* ``queue_wait_ms`` — per push / finish call: from ``push()`` / ``finish()`` handing it to the engine
  to its worker step starting (waiting for the step before it, plus the hand-off); open calls are
  not counted.
* ``idle_ms`` — the worker's gap between the end of one step and the start of the next;
  ``handoff_ms`` — the part of that gap during which a call of the next step was already queued
  (work waiting while the worker sat idle: event-loop / scheduling overhead).
* ``resume_ms`` — from a step's end on the worker to the scheduler (event loop) resuming after it.
* ``urgent_rows`` / ``deferred_rows`` — per step with push / finish calls (deadline-aware only): the
  urgent calls it took, and the pending calls (first of their session) it left for a later step;
  ``aged_rows`` (a counter) — calls taken because they reached ``max_defer_s``.

``busy_s`` = ``step_ms.sum`` / 1000 and ``worker_steps`` = ``step_ms.n``; with two ``stats()`` taken
Δt apart, Δbusy_s / Δt is the worker's busy fraction and Δpush_rows.sum / Δpush_rows.n the mean
rows per push batch over that time. ``t`` is the wall clock (Unix seconds) when the stats were taken.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vocoder_service.engine.step_stats import Recent

log = logging.getLogger(__name__)

SPEECH_VOCAB_SIZE = 6561
SAMPLES_PER_TOKEN = 960
SAMPLE_RATE = 24_000
# deadline-aware steps (VocoderEngine / TTS_VOCODER_URGENT_*; bench/NOTES.md: the CPU simulation)
URGENT_SLACK_S = 0.5
URGENT_FILL = 4
MAX_DEFER_S = 2.0


class UnknownVoiceError(LookupError):
    """The voice is not loaded; the message lists the loaded ones."""


class SessionClosedError(RuntimeError):
    """A call on a session that was closed (or whose backend failed)."""


class BackendSession(Protocol):
    """What the engine needs from a synchronous streaming session.

    Optional: ``tokens_needed() -> int``, how many more tokens ``push`` needs before it can return
    any audio. With it, a session keeps smaller pushes to itself (no trip to the worker thread)
    until that many tokens are there: the result is the same, the engine sees far fewer calls.
    """

    def push(self, token_ids: Sequence[int]) -> np.ndarray: ...

    def finish(self) -> np.ndarray: ...

    def close(self) -> None: ...


_TIMINGS = ("step_ms", "push_ms", "finish_ms", "open_ms", "push_rows", "finish_rows", "push_tokens",
            "queue_wait_ms", "idle_ms", "handoff_ms", "resume_ms", "urgent_rows", "deferred_rows")

OpenBackend = Callable[[str, "int | None"], BackendSession]
StepBatch = Callable[[list[BackendSession], list[list[int]]], list[np.ndarray]]
FinishBatch = Callable[[list[BackendSession]], list[np.ndarray]]


@dataclass
class _Call:
    session: "VocoderSession"
    op: str  # "push" | "finish" | "close" | "open" (``prepare()``: no future, errors go to the session)
    tokens: list[int] = field(default_factory=list)
    future: asyncio.Future | None = None
    queued: float = 0.0  # perf_counter() when handed to the engine (statistics)
    since: float = 0.0  # the engine's clock when handed to the engine (scheduling)


class VocoderEngine:
    """Async streaming sessions over a synchronous backend.

    Args:
        open_backend: ``(voice, seed) -> BackendSession``; called on the worker thread at a session's
            ``prepare()`` or else its first call (so opening costs nothing on the event loop).
        voices: names of the loaded voices; the first is the default.
        step_batch: optional batched push over several backend sessions.
        finish_batch: optional batched finish over several backend sessions.
        max_batch: most calls (sessions) taken into one step.
        hold_pushes: sessions keep pushes below the backend's ``tokens_needed()`` (see BackendSession).
        stats_window_s: the recent window of the percentiles in ``stats()`` (see the module docstring).
        urgent_slack_s: deadline-aware steps (module docstring): calls whose session has less audio
            than this buffered (seconds) are urgent; 0 = FIFO steps.
        urgent_fill: most non-urgent calls a step with urgent calls also takes.
        max_defer_s: a call that has waited this long is urgent whatever its slack (> 0).
        clock: monotonic seconds for the playback clocks and waits (tests inject a fake one).
    """

    def __init__(
        self,
        open_backend: OpenBackend,
        voices: Sequence[str],
        *,
        step_batch: StepBatch | None = None,
        finish_batch: FinishBatch | None = None,
        max_batch: int = 64,
        hold_pushes: bool = True,
        stats_window_s: float = 10.0,
        urgent_slack_s: float = URGENT_SLACK_S,
        urgent_fill: int = URGENT_FILL,
        max_defer_s: float = MAX_DEFER_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not voices:
            raise ValueError("a vocoder engine needs at least one voice")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if urgent_slack_s < 0 or urgent_fill < 0 or max_defer_s <= 0:
            raise ValueError(f"need urgent_slack_s >= 0, urgent_fill >= 0, max_defer_s > 0; got "
                             f"{urgent_slack_s}, {urgent_fill}, {max_defer_s}")
        self._urgent_slack = float(urgent_slack_s)
        self._fill = int(urgent_fill)
        self._max_defer = float(max_defer_s)
        self._clock = clock
        self._aged = 0
        self._early_opens = 0
        self._open_backend = open_backend
        self._voices = list(voices)
        self._step_batch = step_batch
        self._finish_batch = finish_batch
        self._max_batch = max_batch
        self._hold = hold_pushes
        self._pending: list[_Call] = []
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduler: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vocoder")
        self._lock = threading.Lock()
        self._active = 0
        self._opened = 0
        self._steps = 0
        self._batched_steps = 0
        self._tokens = 0
        self._timing = {name: Recent(stats_window_s) for name in _TIMINGS}
        self._worker_end: float | None = None  # perf_counter() at the end of the last worker step

    # ---------------------------------------------------------------- contract
    def voices(self) -> list[str]:
        return list(self._voices)

    @property
    def default_voice(self) -> str:
        return self._voices[0]

    def open_session(self, voice: str, seed: int | None = None) -> "VocoderSession":
        """A new session for ``voice`` (empty = default). Raises ``UnknownVoiceError``."""
        voice = voice or self.default_voice
        if voice not in self._voices:
            raise UnknownVoiceError(f"unknown voice {voice!r}; loaded voices: {', '.join(self._voices)}")
        with self._lock:
            self._active += 1
            self._opened += 1
        return VocoderSession(self, voice, seed)

    def stats(self) -> dict[str, Any]:
        """``active_sessions`` (open, not yet closed), ``opened_sessions``, ``steps`` (backend calls),
        ``batched_steps``, ``tokens``, then the worker statistics of the module docstring."""
        with self._lock:
            out: dict[str, Any] = {
                "active_sessions": self._active,
                "opened_sessions": self._opened,
                "steps": self._steps,
                "batched_steps": self._batched_steps,
                "tokens": self._tokens,
                "aged_rows": self._aged,
                "early_opens": self._early_opens,
                "t": round(time.time(), 3),
                "worker_steps": self._timing["step_ms"].n,
                "busy_s": round(self._timing["step_ms"].sum, 4),
            }
            for name, rec in self._timing.items():
                out[name] = rec.summary(1000.0 if name.endswith("_ms") else 1.0)
            return out

    @property
    def stats_window_s(self) -> float:
        """The recent window (seconds) of the percentiles in ``stats()``."""
        return self._timing["step_ms"].window_s

    @stats_window_s.setter
    def stats_window_s(self, seconds: float) -> None:
        with self._lock:
            for rec in self._timing.values():
                rec.window_s = float(seconds)

    def shutdown(self) -> None:
        """Stop the scheduler and the worker thread (pending calls are cancelled)."""
        if self._scheduler is not None:
            self._scheduler.cancel()
        for call in self._pending:
            if call.future is not None and not call.future.done():
                call.future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- internals
    def _released(self) -> None:
        with self._lock:
            self._active -= 1

    def _submit(self, call: _Call) -> asyncio.Future | None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use (or a new loop in tests): start the scheduler there
            self._loop = loop
            self._wake = asyncio.Event()
            self._scheduler = loop.create_task(self._schedule(), name="vocoder-scheduler")
        if call.op not in ("close", "open"):
            call.future = loop.create_future()
        if call.op in ("push", "finish"):
            call.session._prepared = True  # the session's own calls open the backend from now on
        call.queued = time.perf_counter()
        call.since = self._clock()
        self._pending.append(call)
        self._wake.set()
        return call.future

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._select()
                if not batch:
                    continue
                try:
                    results = await loop.run_in_executor(self._executor, self._run_step, batch)
                except Exception as exc:  # the whole step failed: fail its callers
                    log.exception("vocoder step failed")
                    results = [exc] * len(batch)
                else:  # (a failed step recorded no end: resume_ms would span the step)
                    resumed = time.perf_counter()
                    with self._lock:
                        if self._worker_end is not None:
                            self._timing["resume_ms"].add(max(0.0, resumed - self._worker_end))
                now = self._clock()
                for call, result in zip(batch, results):
                    if call.future is None or call.future.done():
                        continue
                    if isinstance(result, BaseException):
                        call.future.set_exception(result)
                    else:
                        if getattr(result, "size", 0):  # audio the client gets now: its playback clock
                            call.session._delivered(now, result.size / SAMPLE_RATE)
                        call.future.set_result(result)

    def _select(self) -> list[_Call]:
        """The next step's calls, taken out of ``_pending`` (the rest stay, in order); see the
        module docstring. Drops calls whose caller gave up (cancelled) before they ran."""
        heads, closes, opens, folded, seen = [], [], [], [], set()
        # an open is its session's first call: with any other call of the session queued it is
        # folded into that call (which opens the backend itself), so it never delays a push
        busy = {id(c.session) for c in self._pending if c.op != "open"}
        for call in self._pending:
            if call.op == "open":
                (folded if id(call.session) in busy else opens).append(call)
                continue
            if id(call.session) in seen:  # one call per session per step keeps each session's calls in order
                continue
            if call.future is not None and call.future.done():
                continue  # caller gave up (cancelled) before it ran
            seen.add(id(call.session))
            (closes if call.op == "close" else heads).append(call)
        opens = opens[:self._max_batch]  # the rest stay queued for the next step
        first = closes + opens  # cheap: they go first, outside the push / finish rows
        if self._urgent_slack <= 0:  # FIFO
            take = heads[:self._max_batch]
            self._keep_pending(first + folded + take)
            return first + take
        now = self._clock()
        keyed = []
        aged = 0
        for call in heads:
            waited = now - call.since
            slack = call.session._slack(now, waited)
            if waited >= self._max_defer:
                keyed.append(((0, call.since), True, call))
                aged += 1
            else:
                keyed.append(((1, slack, call.since), slack < self._urgent_slack, call))
        keyed.sort(key=lambda k: k[0])
        urgent = [c for _, u, c in keyed if u]
        others = [c for _, u, c in keyed if not u]
        if urgent:
            take = urgent[:self._max_batch]
            take += others[:min(self._fill, self._max_batch - len(take))]
        else:
            take = others[:self._max_batch]
        self._keep_pending(first + folded + take)
        if take:
            with self._lock:
                self._aged += min(aged, len(take))
                self._timing["urgent_rows"].add(min(len(urgent), self._max_batch))
                self._timing["deferred_rows"].add(len(heads) - len(take))
        return first + take

    def _keep_pending(self, taken: list[_Call]) -> None:
        """``_pending`` without the ``taken`` calls and those whose caller gave up, in submit order."""
        ids = {id(c) for c in taken}
        self._pending = [c for c in self._pending
                         if id(c) not in ids and not (c.future is not None and c.future.done())]

    def _run_step(self, batch: list[_Call]) -> list[Any]:
        """Worker thread: run one call per session; pushes (and finishes) batched when the backend can."""
        start = time.perf_counter()
        opens: list[float] = []  # seconds of each backend session opened
        # the step's push / finish part: its calls (batch indices) and its wall seconds (the calls run one
        # by one, plus the batched call)
        rows: dict[str, list[int]] = {"push": [], "finish": []}
        part_s = {"push": 0.0, "finish": 0.0}
        results: list[Any] = [None] * len(batch)
        pushes, finishes = [], []
        for i, call in enumerate(batch):
            s = call.session
            if call.op == "close":
                s._release_backend()
                continue
            if call.op == "open":  # prepare(): open now, keep a failure for the session's next call
                if s._backend is None and s._open_error is None and not s._closed:
                    t0 = time.perf_counter()
                    try:
                        s._backend = self._open_backend(s.voice, s.seed)
                    except Exception as exc:  # noqa: BLE001 - raised by the next push / finish
                        s._open_error = exc
                    opens.append(time.perf_counter() - t0)
                    with self._lock:
                        self._early_opens += 1
                continue
            if s._backend is None:
                if s._open_error is not None:  # the early open failed: this call fails with its error
                    results[i] = s._open_error
                    continue
                t0 = time.perf_counter()
                try:
                    s._backend = self._open_backend(s.voice, s.seed)
                except Exception as exc:
                    results[i] = exc
                    continue
                finally:
                    opens.append(time.perf_counter() - t0)
            if call.op == "push" and self._step_batch is not None:
                pushes.append(i)
            elif call.op == "finish" and self._finish_batch is not None:
                finishes.append(i)
            else:
                t0 = time.perf_counter()
                results[i] = self._run_one(call)
                part_s[call.op] += time.perf_counter() - t0
                rows[call.op].append(i)
        if pushes:
            t0 = time.perf_counter()
            self._run_batched(batch, pushes, results,
                              lambda bs: self._step_batch(bs, [batch[i].tokens for i in pushes]))
            part_s["push"] += time.perf_counter() - t0
            rows["push"] += pushes
        if finishes:
            t0 = time.perf_counter()
            self._run_batched(batch, finishes, results, self._finish_batch)
            part_s["finish"] += time.perf_counter() - t0
            rows["finish"] += finishes
        for call in batch:
            s = call.session
            if s._closed and call.op != "close":  # closed while its call ran: release it now
                s._release_backend()
            elif s._backend is not None and hasattr(s._backend, "tokens_needed"):
                try:
                    s._need = int(s._backend.tokens_needed())
                except Exception:  # noqa: BLE001 - a backend that cannot tell gets every push
                    s._need = 0
        self._record_step(batch, start, time.perf_counter(), opens, rows, part_s)
        return results

    def _record_step(self, batch: list[_Call], start: float, end: float, opens: list[float],
                     rows: dict[str, list[int]], part_s: dict[str, float]) -> None:
        """Worker thread: one worker step's figures into the statistics (module docstring). ``rows``:
        the batch indices of the step's push / finish part; ``part_s``: each part's wall seconds."""
        calls = [c for c in batch if c.op != "close"]  # work (pushes, finishes, opens)
        tm = self._timing
        with self._lock:
            prev_end, self._worker_end = self._worker_end, end
            tm["step_ms"].add(end - start)
            if prev_end is not None:
                tm["idle_ms"].add(max(0.0, start - prev_end))
                if calls:  # idle while a call of this step already waited
                    first = min(c.queued for c in calls)
                    tm["handoff_ms"].add(max(0.0, start - max(prev_end, first)))
            for c in calls:
                if c.op != "open":
                    tm["queue_wait_ms"].add(max(0.0, start - c.queued))
            for dt in opens:
                tm["open_ms"].add(dt)
            if rows["push"]:
                tm["push_ms"].add(part_s["push"])
                tm["push_rows"].add(len(rows["push"]))
                for i in rows["push"]:
                    tm["push_tokens"].add(len(batch[i].tokens))
            if rows["finish"]:
                tm["finish_ms"].add(part_s["finish"])
                tm["finish_rows"].add(len(rows["finish"]))

    def _run_batched(self, batch: list[_Call], idx: list[int], results: list[Any],
                     run: Callable[[list[BackendSession]], list[np.ndarray]]) -> None:
        if len(idx) == 1:
            results[idx[0]] = self._run_one(batch[idx[0]])
            return
        try:
            audios = run([batch[i].session._backend for i in idx])
        except Exception as exc:  # the batch failed as a whole: every call in it fails
            for i in idx:
                results[i] = exc
            return
        for i, audio in zip(idx, audios):
            results[i] = np.asarray(audio, dtype=np.float32).reshape(-1)
        with self._lock:
            self._steps += 1
            self._batched_steps += 1
            self._tokens += sum(len(batch[i].tokens) for i in idx)

    def _run_one(self, call: _Call) -> Any:
        backend = call.session._backend
        try:
            audio = backend.push(call.tokens) if call.op == "push" else backend.finish()
        except Exception as exc:
            return exc
        with self._lock:
            self._steps += 1
            self._tokens += len(call.tokens)
        return np.asarray(audio, dtype=np.float32).reshape(-1)


class VocoderSession:
    """One streaming vocoder session (see the module docstring). Not thread-safe; one task drives it."""

    def __init__(self, engine: VocoderEngine, voice: str, seed: int | None):
        self.engine = engine
        self.voice = voice
        self.seed = seed
        self._backend: BackendSession | None = None
        self._open_error: Exception | None = None  # a failed prepare() open, raised by the next call
        self._prepared = False
        self._closed = False
        self._finished = False
        self._order = asyncio.Lock()
        self._held: list[int] = []  # tokens kept back: fewer than the backend needs for audio
        self._need = 0  # the backend's tokens_needed() after its last call (0: unknown, push all)
        # playback clock (engine clock): when the client's buffer runs dry if it plays from its first audio
        self._play_end: float | None = None
        self.first_audio_at: float | None = None  # engine clock when the first audio was returned
        self.audio_s = 0.0  # seconds of audio returned so far

    def _delivered(self, now: float, seconds: float) -> None:
        """``seconds`` of audio returned at ``now``: the client's buffer grows (after re-buffering
        if it had run dry)."""
        if self.first_audio_at is None:
            self.first_audio_at = now
        self._play_end = max(self._play_end if self._play_end is not None else now, now) + seconds
        self.audio_s += seconds

    def _slack(self, now: float, waited: float) -> float:
        """Seconds of audio the client still has buffered; before any audio, minus ``waited``."""
        return -waited if self._play_end is None else self._play_end - now

    @property
    def closed(self) -> bool:
        return self._closed

    def prepare(self) -> None:
        """Open the backend session now, on the worker, ahead of the first push (module docstring:
        early open). Returns at once (call it from the engine's event loop); idempotent, and a no-op
        once the session has made a call or was closed. A failed open is raised by the next
        ``push()`` / ``finish()``."""
        if self._prepared or self._closed or self._backend is not None or self._finished:
            return
        self._prepared = True
        self.engine._submit(_Call(self, "open"))

    async def push(self, token_ids: Sequence[int]) -> np.ndarray:
        """Add speech tokens (each < 6561); returns the audio that became final, float32 (N,)."""
        ids = [int(t) for t in token_ids]
        bad = [t for t in ids if not 0 <= t < SPEECH_VOCAB_SIZE]
        if bad:
            raise ValueError(f"speech token id {bad[0]} out of range [0, {SPEECH_VOCAB_SIZE})")
        async with self._order:
            self._check_usable()
            self._held.extend(ids)
            if self.engine._hold and len(self._held) < max(self._need, 1):
                return np.zeros(0, np.float32)  # no audio before the backend has what it needs
            ids, self._held = self._held, []
            return await self.engine._submit(_Call(self, "push", ids))

    async def finish(self) -> np.ndarray:
        """End of tokens: the rest of the audio, float32 (N,)."""
        async with self._order:
            self._check_usable()
            head = np.zeros(0, np.float32)
            if self._held:
                ids, self._held = self._held, []
                head = await self.engine._submit(_Call(self, "push", ids))
            out = await self.engine._submit(_Call(self, "finish", []))
            self._finished = True
            return np.concatenate([head, out]) if head.size else out

    def close(self) -> None:
        """Free the session (idempotent). Safe to call from any point, also while a call runs."""
        if self._closed:
            return
        self._closed = True
        self.engine._released()
        try:
            self.engine._submit(_Call(self, "close"))
        except RuntimeError:  # no running loop (interpreter exit): release here
            self._release_backend()

    def _check_usable(self) -> None:
        if self._closed:
            raise SessionClosedError("vocoder session is closed")
        if self._finished:
            raise SessionClosedError("vocoder session already finished")

    def _release_backend(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                backend.close()
            except Exception:
                log.warning("closing a vocoder backend session failed", exc_info=True)
