"""The async vocoder engine: many streaming sessions, one compute thread, per-session order kept.

The S3Gen streaming session (``vocoder_service.s3gen.streaming.StreamingSession``) is synchronous:
``push(tokens) -> audio``, ``finish() -> audio``, ``close()``. This engine puts an asyncio face on it
(the contract in docs/ARCHITECTURE.md):

    session = engine.open_session("default", seed=0)
    audio = await session.push([1, 2, 3])   # float32 (N,) at 24 kHz, N may be 0
    audio = await session.finish()          # the rest; 960 samples per token in total
    session.close()                         # idempotent, frees the slot at once

Scheduling: calls from all sessions go to one queue. A scheduler task takes everything pending (at
most one call per session, so each session's calls run in the order they were made) and runs it on a
single worker thread (torch's intra-op threads do the parallel work). When the backend offers a
batched step (``step_batch(sessions, token_lists) -> list[audio]``) the pending pushes of several
sessions run as one batch; otherwise they run one after another. A caller that is cancelled while its
call waits is simply dropped; ``close()`` marks the session closed at once and the backend session is
released on the worker thread after any step it is in.

One engine serves one event loop at a time (the server's); the scheduler task starts on the loop of
the first call and moves to a new loop only when used from one (tests run several loops in turn).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

SPEECH_VOCAB_SIZE = 6561
SAMPLES_PER_TOKEN = 960
SAMPLE_RATE = 24_000


class UnknownVoiceError(LookupError):
    """The voice is not loaded; the message lists the loaded ones."""


class SessionClosedError(RuntimeError):
    """A call on a session that was closed (or whose backend failed)."""


class BackendSession(Protocol):
    """What the engine needs from a synchronous streaming session."""

    def push(self, token_ids: Sequence[int]) -> np.ndarray: ...

    def finish(self) -> np.ndarray: ...

    def close(self) -> None: ...


OpenBackend = Callable[[str, "int | None"], BackendSession]
StepBatch = Callable[[list[BackendSession], list[list[int]]], list[np.ndarray]]


@dataclass
class _Call:
    session: "VocoderSession"
    op: str  # "push" | "finish" | "close"
    tokens: list[int] = field(default_factory=list)
    future: asyncio.Future | None = None


class VocoderEngine:
    """Async streaming sessions over a synchronous backend.

    Args:
        open_backend: ``(voice, seed) -> BackendSession``; called on the worker thread at a session's
            first call (so opening costs nothing on the event loop).
        voices: names of the loaded voices; the first is the default.
        step_batch: optional batched push over several backend sessions.
        max_batch: most sessions stepped together.
    """

    def __init__(
        self,
        open_backend: OpenBackend,
        voices: Sequence[str],
        *,
        step_batch: StepBatch | None = None,
        max_batch: int = 16,
    ):
        if not voices:
            raise ValueError("a vocoder engine needs at least one voice")
        self._open_backend = open_backend
        self._voices = list(voices)
        self._step_batch = step_batch
        self._max_batch = max_batch
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

    def stats(self) -> dict[str, int]:
        """``active_sessions`` (open, not yet closed), ``opened_sessions``, ``steps``, ``batched_steps``, ``tokens``."""
        with self._lock:
            return {
                "active_sessions": self._active,
                "opened_sessions": self._opened,
                "steps": self._steps,
                "batched_steps": self._batched_steps,
                "tokens": self._tokens,
            }

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
        if call.op != "close":
            call.future = loop.create_future()
        self._pending.append(call)
        self._wake.set()
        return call.future

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, rest, seen = [], [], set()
                for call in self._pending:
                    # one call per session per step keeps each session's calls in order
                    if id(call.session) in seen or len(batch) >= self._max_batch:
                        rest.append(call)
                    elif call.future is not None and call.future.done():
                        continue  # caller gave up (cancelled) before it ran
                    else:
                        seen.add(id(call.session))
                        batch.append(call)
                self._pending = rest
                if not batch:
                    continue
                try:
                    results = await loop.run_in_executor(self._executor, self._run_step, batch)
                except Exception as exc:  # the whole step failed: fail its callers
                    log.exception("vocoder step failed")
                    results = [exc] * len(batch)
                for call, result in zip(batch, results):
                    if call.future is None or call.future.done():
                        continue
                    if isinstance(result, BaseException):
                        call.future.set_exception(result)
                    else:
                        call.future.set_result(result)

    def _run_step(self, batch: list[_Call]) -> list[Any]:
        """Worker thread: run one call per session; pushes batched when the backend can."""
        results: list[Any] = [None] * len(batch)
        pushes = []
        for i, call in enumerate(batch):
            s = call.session
            if call.op == "close":
                s._release_backend()
                continue
            if s._backend is None:
                try:
                    s._backend = self._open_backend(s.voice, s.seed)
                except Exception as exc:
                    results[i] = exc
                    continue
            if call.op == "push" and self._step_batch is not None:
                pushes.append(i)
                continue
            results[i] = self._run_one(call)
        if len(pushes) == 1:
            results[pushes[0]] = self._run_one(batch[pushes[0]])
        elif pushes:
            try:
                audios = self._step_batch([batch[i].session._backend for i in pushes], [batch[i].tokens for i in pushes])
                for i, audio in zip(pushes, audios):
                    results[i] = np.asarray(audio, dtype=np.float32).reshape(-1)
                with self._lock:
                    self._steps += 1
                    self._batched_steps += 1
                    self._tokens += sum(len(batch[i].tokens) for i in pushes)
            except Exception as exc:
                for i in pushes:
                    results[i] = exc
        for call in batch:  # a session closed while its call ran: release it now
            if call.session._closed and call.op != "close":
                call.session._release_backend()
        return results

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
        self._closed = False
        self._finished = False
        self._order = asyncio.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    async def push(self, token_ids: Sequence[int]) -> np.ndarray:
        """Add speech tokens (each < 6561); returns the audio that became final, float32 (N,)."""
        ids = [int(t) for t in token_ids]
        bad = [t for t in ids if not 0 <= t < SPEECH_VOCAB_SIZE]
        if bad:
            raise ValueError(f"speech token id {bad[0]} out of range [0, {SPEECH_VOCAB_SIZE})")
        return await self._call("push", ids)

    async def finish(self) -> np.ndarray:
        """End of tokens: the rest of the audio, float32 (N,)."""
        out = await self._call("finish", [])
        self._finished = True
        return out

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

    async def _call(self, op: str, ids: list[int]) -> np.ndarray:
        async with self._order:
            if self._closed:
                raise SessionClosedError("vocoder session is closed")
            if self._finished:
                raise SessionClosedError("vocoder session already finished")
            return await self.engine._submit(_Call(self, op, ids))

    def _release_backend(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                backend.close()
            except Exception:
                log.warning("closing a vocoder backend session failed", exc_info=True)
