"""The token engine: continuous batching of T3 generations behind an asyncio API.

A background thread runs the step loop (admit + prefill new sequences, one batched decode step
for all running ones, release finished ones); results go back to each caller's event loop with
``loop.call_soon_threadsafe``. Contract (docs/ARCHITECTURE.md)::

    engine.voices() -> list[str]
    engine.tokenize(text) -> list[int]                 # raises TextError on empty / too long
    stream = engine.generate(voice, text_ids, SamplingParams(...))
    async for ids in stream: ...                       # lists of speech ids < 6561, in order
    await stream.aclose()                              # cancel: the KV slot is free on return
    engine.stats() -> {"active": ..., "free_slots": ..., ...}
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence as Seq

import torch

from ..t3.config import SPEECH_VOCAB_VALID, STOP_SPEECH
from ..t3.loader import load_t3, load_voice_conds_all
from ..t3.model import T3Model
from ..t3.sampling import SamplingParams
from ..t3.text import MAX_TEXT_TOKENS, TextError, TextTokenizer
from ..t3.voice import VoiceConds, VoicePrefix, build_voice_prefix
from .model_runner import DecodeHandle, ModelRunner, RunnerShape
from .scheduler import EngineOverloaded, Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)

_END = object()


def resolve_kernels(kernels: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA (the runner falls back to torch if Triton fails), else ``torch``."""
    if kernels == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return kernels


@dataclass
class EngineConfig:
    """Everything the token engine needs; ``device``/``dtype`` ``"auto"`` = CUDA + bf16 if present, else CPU fp32.

    ``max_seq_len`` bounds prefix + text + 1 + generated tokens per slot; KV memory is
    ``2 · n_layer · n_embd · max_seq_len · bytes`` per slot (Turbo bf16, 2048: 201 MB), allocated
    in groups of ``kv_first_group, kv_first_group, 2×, 4×, …`` slots the first time a group is
    needed (``kv_first_group=0``: all ``max_slots`` at start-up). ``preallocate_slots`` creates
    the groups covering that many slots (and captures their graphs) at start-up instead.

    ``compile`` (off by default) runs the decode step through ``torch.compile``'d segments
    (``t3.compiled``; inductor/Triton on CUDA, C++ on CPU) in mode ``compile_mode``; compiling
    happens when a KV group is created, before its graph capture. A failure logs a warning and the
    engine decodes eagerly (``stats()["compiled"]`` 0, ``compile_status`` says why).

    ``kernels = "triton"`` computes the logits of decode batches of 1 and 2 rows with the
    hand-written Triton kernels of ``t3.triton_decode`` (one CUDA graph per batch bucket; H100: 0.63
    vs 1.27 ms at batch 1); ``"auto"`` (default) means triton on CUDA, torch elsewhere. Without
    Triton, or if they fail at start-up, the engine uses the torch step (``kernels_status`` says why).

    ``overlap_steps`` (opt-in) queues decode step N+1 on the device before reading step N's ids, so
    the host's per-step work (emitting, the scheduler, picking the graph) runs while the GPU computes
    instead of between steps. The tokens are the same; a sequence that ends at step N was already in
    step N+1 (its extra id is dropped), so each request reserves one more KV position.
    ``overlap_depth`` D (with ``overlap_steps``) keeps D steps queued ahead of the one being read
    (1 = step N+1 only; 2 = steps N+1 and N+2 are queued before step N's ids are read); a sequence
    that ends at step N was already in steps N+1 .. N+D, so each request reserves D more KV positions.
    """

    model_dir: str | Path
    voices_dir: str | Path | None = None
    device: str = "auto"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_slots: int = 64
    max_seq_len: int = 2048
    max_waiting: int = 256
    max_prefills_per_step: int = 8
    prefill_rows: int = 4  # CUDA: sequences prefilled together in one staged graph run
    cuda_graphs: bool = True
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64)
    kv_bucket: int = 256
    kv_first_group: int = 8
    preallocate_slots: int = 0
    default_max_new_tokens: int = 1001  # upstream's max_gen_len=1000 -> at most 1001 samples
    compile: bool = False  # torch.compile the decode step (opt-in, issue 6)
    compile_mode: str = "default"  # default | max-autotune-no-cudagraphs (inductor never adds its own graphs)
    kernels: str = "auto"  # auto | torch | triton: small-batch decode step through t3.triton_decode (auto: on CUDA)
    overlap_steps: bool = False  # launch decode step N+1 before reading step N's ids (opt-in)
    overlap_depth: int = 1  # overlap_steps: steps queued ahead of the one being read (1: N+1; 2: N+1 and N+2)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            dt = getattr(torch, self.dtype)
        except AttributeError:
            dt = None
        if dt not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        return dt


def _put_all(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


class LLMEngine:
    """Owns the model, the voices, the scheduler and the step thread."""

    def __init__(self, config: EngineConfig, *, model: T3Model | None = None,
                 voices: dict[str, VoiceConds] | None = None, tokenizer: TextTokenizer | None = None):
        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype(self.device)
        if model is None:
            model = load_t3(config.model_dir)
        self.model = model.drop_unused().to(self.device, self.dtype).eval()
        self.cfg = self.model.cfg
        if voices is None:
            voices = load_voice_conds_all(config.model_dir, config.voices_dir, self.cfg.prompt_len)
        if not voices:
            raise ValueError("the engine needs at least one voice")
        self.prefixes: dict[str, VoicePrefix] = {n: build_voice_prefix(self.model, c.validate(self.cfg, f"voice {n!r}"), n)
                                                 for n, c in voices.items()}
        self.prefix_len = self.cfg.prefix_len
        if config.max_seq_len > self.cfg.n_positions:
            raise ValueError(f"max_seq_len={config.max_seq_len} exceeds the model's n_positions={self.cfg.n_positions}")
        if config.overlap_depth < 1:
            raise ValueError(f"overlap_depth must be >= 1, got {config.overlap_depth}")
        # overlapped steps: a sequence's last step is followed by overlap_depth more (already queued), each
        # writing its newest id one position further: reserve those positions
        self.overlap_depth = config.overlap_depth if config.overlap_steps else 0
        self.reserved_positions = self.overlap_depth
        # text budget: leave room for the default number of new tokens
        self.max_text_tokens = min(MAX_TEXT_TOKENS, config.max_seq_len - self.prefix_len - config.default_max_new_tokens
                                   - self.reserved_positions)
        if self.max_text_tokens < 1:
            raise ValueError(f"max_seq_len={config.max_seq_len} leaves no room for text after the {self.prefix_len}-token "
                             f"voice prefix and {config.default_max_new_tokens} new tokens")
        self.tokenizer = tokenizer if tokenizer is not None else TextTokenizer(config.model_dir, self.max_text_tokens)
        self.tokenizer.max_tokens = min(self.tokenizer.max_tokens, self.max_text_tokens)
        sizes = tuple(sorted(b for b in config.graph_batch_sizes if b < config.max_slots)) + (config.max_slots,)
        self.runner = ModelRunner(self.model, RunnerShape(config.max_slots, config.max_seq_len, sizes, config.kv_bucket,
                                                          config.cuda_graphs, config.kv_first_group,
                                                          prefill_rows=max(1, min(config.prefill_rows, config.max_prefills_per_step)),
                                                          compile=config.compile, compile_mode=config.compile_mode,
                                                          kernels=resolve_kernels(config.kernels, self.device),
                                                          overlap_depth=max(1, self.overlap_depth)),
                                  self.device, self.dtype)
        for i, g in enumerate(self.runner.groups):
            if g.start < min(config.preallocate_slots, config.max_slots):
                self.runner.ensure_group(i)
        self.scheduler = Scheduler(config.max_slots, config.max_waiting, config.max_prefills_per_step)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._counters = dict(steps=0, tokens=0, finished=0, cancelled=0, failed=0)
        # engine-thread time split (seconds): prefill (incl. first sample), decode (incl. the id read-back)
        self._pending: dict[object, list] = {}  # event loop -> [(queue, item)] of this step
        self._timing = dict(prefill_s=0.0, prefills=0, decode_s=0.0, decodes=0, emit_s=0.0)
        # overlap_steps: the steps queued on the device whose ids are not read yet (oldest first), each
        # with the sequences it ran; at most overlap_depth + 1 (the runner's host buffers)
        self._inflight: deque[tuple[list[Sequence], DecodeHandle]] = deque()
        self._thread = threading.Thread(target=self._loop, name="t3-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def voices(self) -> list[str]:
        return sorted(self.prefixes)

    def tokenize(self, text: str) -> list[int]:
        """Normalise + tokenise; raises :class:`TextError` for empty or over-long text."""
        return self.tokenizer.tokenize(text)

    def generate(self, voice: str, text_ids: Seq[int], params: SamplingParams | None = None) -> AsyncIterator[list[int]]:
        """Validate now (``ValueError`` naming the problem), then return the stream of speech ids.

        The sequence is queued when iteration starts; leaving the loop, ``aclose()`` or cancelling
        the consuming task releases its slot at once.
        """
        params = params or SamplingParams(max_new_tokens=self.config.default_max_new_tokens)
        if voice not in self.prefixes:
            raise ValueError(f"unknown voice {voice!r}; available: {', '.join(self.voices())}")
        ids = [int(t) for t in text_ids]
        if not ids:
            raise TextError("text_ids is empty")
        bad = [t for t in ids if not 0 <= t < self.cfg.text_vocab_size]
        if bad:
            raise ValueError(f"text ids out of range [0, {self.cfg.text_vocab_size}): {bad[:5]}")
        need = self.prefix_len + len(ids) + params.max_new_tokens + self.reserved_positions
        if need > self.config.max_seq_len:
            r = self.reserved_positions
            extra = f" + {r} position{'s' if r > 1 else ''} for the overlapped step{'s' if r > 1 else ''}" if r else ""
            raise TextError(f"request too long: {len(ids)} text tokens + {params.max_new_tokens} new tokens + the "
                            f"{self.prefix_len}-token voice prefix{extra} = {need} positions > max_seq_len "
                            f"{self.config.max_seq_len}")
        seq = Sequence(voice=voice, text_ids=ids, params=params, seed=params.resolved_seed())
        return self._stream(seq)

    def stats(self) -> dict[str, int]:
        with self._lock:
            running, waiting = len(self.scheduler.running), len(self.scheduler.waiting)
            return dict(active=running + waiting, running=running, waiting=waiting,
                        free_slots=self.scheduler.free_slots, max_slots=self.config.max_slots,
                        compiled=int(self.runner.compiled is not None), **self._counters)

    @property
    def compile_status(self) -> str:
        """``off`` | ``on`` | ``fallback: <why>`` (compile was asked for and failed; decoding eagerly)."""
        return self.runner.compile_status

    @property
    def kernels_status(self) -> str:
        """``torch`` | ``triton`` | ``fallback: <why>`` (Triton kernels were asked for and failed)."""
        return self.runner.kernels_status

    def timings(self) -> dict[str, float]:
        """Engine-thread seconds spent in prefill / decode / emitting, and how many of each (profiling)."""
        return dict(self._timing, kv_gb=self.runner.kv_nbytes() / 1e9)

    def close(self) -> None:
        """Stop the step thread; streams still open end with an error."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ streams
    async def _stream(self, seq: Sequence) -> AsyncIterator[list[int]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                self._cancel(seq)

        seq.deliver = deliver
        seq.loop, seq.queue = loop, queue
        with self._wake:
            if self._stop:
                raise RuntimeError("the token engine is shut down")
            self.scheduler.add(seq)  # may raise EngineOverloaded
            self._wake.notify()
        try:
            while True:
                item = await queue.get()
                batch: list[int] = []
                while True:  # coalesce whatever else is already there
                    if item is _END:
                        if batch:
                            yield batch
                        return
                    if isinstance(item, BaseException):
                        raise item
                    batch.extend(item)  # type: ignore[arg-type]
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                yield batch
        finally:
            if not seq.finished:
                self._cancel(seq)

    def _cancel(self, seq: Sequence) -> None:
        with self._wake:
            seq.cancelled = True
            if self.scheduler.finish(seq):
                self._counters["cancelled"] += 1
            self._wake.notify()

    # ------------------------------------------------------------------ step loop (engine thread)
    def _loop(self) -> None:
        try:
            self._loop_body()
        except BaseException as e:  # the thread itself died: no stream may wait forever
            log.exception("token engine thread died")
            with self._wake:
                self._stop = True
            self._fail_all(RuntimeError(f"the token engine stopped: {type(e).__name__}: {e}"), locked=False)

    def _loop_body(self) -> None:
        torch.set_grad_enabled(False)
        if self.device.type == "cuda":
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.set_device(idx)
        while True:
            with self._wake:
                while not self._stop and not self.scheduler.has_work() and not self._inflight:
                    self._wake.wait()
                if self._stop:
                    self._inflight.clear()  # their sequences fail below; their ids are never read
                    self._fail_all(RuntimeError("the token engine was shut down"), locked=True)
                    return
                self.runner.deactivate(self.scheduler.take_released())
                admitted = self.scheduler.admit()
            try:
                self._step(admitted)
            except Exception as e:  # a failed step ends the sequences in it, never the engine
                log.exception("token engine step failed")
                self._inflight.clear()  # their sequences fail with the rest
                self._fail_all(e, locked=False)

    def _step(self, admitted: list[Sequence]) -> None:
        try:
            self._step_inner(admitted)
        finally:
            self._flush()

    def _flush(self) -> None:
        """Hand this step's items to their event loops: one ``call_soon_threadsafe`` per loop."""
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody listens any more
                with self._lock:
                    orphans = [s for s in self.scheduler.running.values() if s.loop is loop]
                for seq in orphans:
                    self._cancel(seq)

    def _post(self, seq: Sequence, item: object) -> None:
        if seq.loop is None:  # a Sequence not made by _stream (tests): deliver directly
            seq.deliver(item)
        else:
            self._pending.setdefault(seq.loop, []).append((seq.queue, item))

    def _step_inner(self, admitted: list[Sequence]) -> None:
        tm = self._timing
        admitted = [s for s in admitted if not s.cancelled]
        if admitted:
            t0 = time.perf_counter()
            toks = self.runner.prefill_many(admitted, [self.prefixes[s.voice] for s in admitted])
            tm["prefill_s"] += time.perf_counter() - t0
            tm["prefills"] += len(admitted)
            for seq, tok in zip(admitted, toks):
                seq.prefilled = True
                self._emit(seq, tok)
            self._flush()  # first tokens go out now, not after the decode step
        with self._lock:
            batch = self.scheduler.decode_batch()
        batch = [s for s in batch if not s.cancelled]
        if self.config.overlap_steps:
            self._overlapped_decode(batch)
            return
        if not batch:
            return
        t0 = time.perf_counter()
        toks = self.runner.decode([(s.slot, s.position) for s in batch])
        t1 = time.perf_counter()
        self._counters["steps"] += 1
        for seq in batch:
            seq.position += 1
            self._emit(seq, toks[seq.slot])
        tm["decode_s"] += t1 - t0
        tm["decodes"] += 1
        tm["emit_s"] += time.perf_counter() - t1

    def _overlapped_decode(self, batch: list[Sequence]) -> None:
        """Queue the step over ``batch``; THEN, once ``overlap_depth`` steps are queued after the oldest
        unread one (or when there is nothing to queue: drain in order), read that oldest step's ids and
        emit them for the sequences it ran (those finished or cancelled since are skipped by ``_emit``;
        sequences admitted since are not in it). Host positions move when a step is queued, as the
        device's do, so the next launch picks its KV bucket from where the rows really are. A slot
        freed meanwhile is re-armed (deactivate, prefill) by work queued on the same stream after the
        steps that still write it, so reusing it at once is safe."""
        tm = self._timing
        t0 = time.perf_counter()
        if batch:
            handle = self.runner.decode_launch([(s.slot, s.position) for s in batch])
            for seq in batch:
                seq.position += 1
            self._inflight.append((batch, handle))
            self._counters["steps"] += 1
        if not self._inflight or (batch and len(self._inflight) <= self.overlap_depth):
            tm["decode_s"] += time.perf_counter() - t0
            return
        ran, handle = self._inflight.popleft()
        toks = self.runner.decode_collect(handle)
        t1 = time.perf_counter()
        for seq in ran:
            self._emit(seq, toks[seq.slot])
        tm["decode_s"] += t1 - t0
        tm["decodes"] += 1
        tm["emit_s"] += time.perf_counter() - t1

    def _emit(self, seq: Sequence, tok: int) -> None:
        """Account one sampled token of ``seq``: stream it, or end the sequence (ids sampled for a
        sequence that already ended, by overlapped steps, are dropped)."""
        if seq.cancelled or seq.finished:
            return
        seq.n_sampled += 1
        self._counters["tokens"] += 1
        done = tok == STOP_SPEECH or seq.n_sampled >= seq.params.max_new_tokens
        if tok != STOP_SPEECH and tok < SPEECH_VOCAB_VALID:
            self._post(seq, [tok])
        if done:
            with self._lock:
                if self.scheduler.finish(seq):
                    self._counters["finished"] += 1
            self._post(seq, _END)

    def _fail_all(self, err: Exception, locked: bool) -> None:
        if not locked:
            self._lock.acquire()
        try:
            seqs = list(self.scheduler.running.values()) + list(self.scheduler.waiting)
            for seq in seqs:
                if self.scheduler.finish(seq):
                    self._counters["failed"] += 1
        finally:
            if not locked:
                self._lock.release()
        for seq in seqs:
            seq.deliver(err)


__all__ = ["EngineConfig", "LLMEngine", "EngineOverloaded", "SamplingParams", "TextError"]
