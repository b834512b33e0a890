"""`tts-token-service`: the gRPC TokenService (T3 + relay of the vocoder service's audio).

One ``Synthesize`` stream runs three tasks joined by bounded queues (bounded, so a slow client or a slow
vocoder holds back T3 instead of growing memory):

    client text ─▶ [reader: SentenceSplitter] ─sentences─▶ [t3: tokenize, generate, +3 silence]
                                                                    │ token chunks
    client ◀─ audio chunks ◀─ [relay: decode f32, re-encode] ◀─ Vocode call (one per synthesis)

The handler is an async generator that yields what the relay produces. Any task's failure is a
``_Failure`` (gRPC status + message) that ends the stream with that status; on any end (success,
failure, client cancel, deadline) ``finally`` cancels the tasks, which closes the T3 stream (frees its
KV slot) and cancels the Vocode call (frees the vocoder session) before the handler returns. The
client's deadline is passed on as the Vocode call's timeout; trace context goes in its metadata.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from token_service.sentences import SentenceSplitter, split_sentences
from tts_api.v1 import common_pb2, token_service_pb2, token_service_pb2_grpc, vocoder_service_pb2, vocoder_service_pb2_grpc
from tts_common.audio import SAMPLES_PER_TOKEN, StreamEncoder, resolve_format
from tts_common.grpc_server import Admission, ServiceServer, serve_until_signal, service_main
from tts_common.gpu_memory import gpu_memory_mb
from tts_common.stats_log import StatsLogger
from tts_common.telemetry import Telemetry, context_from_metadata, outgoing_metadata

log = logging.getLogger("token_service.server")

SERVICE_NAME = token_service_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name
SILENCE_TOKEN = 4299  # upstream's S3GEN_SIL, appended 3x after each sentence
SILENCE_TOKENS = [SILENCE_TOKEN] * 3
SPEECH_VOCAB_SIZE = 6561
QUEUE_CHUNKS = 64  # bound of each queue between the tasks of one stream
OUT_QUEUE_CHUNKS = 4  # audio chunks (up to 1 s each) held for a client that reads slowly (tests/reliability)
VOCODER_LINK_MAX_BYTES = 4 * 1024 * 1024
DRAIN_INPUT_S = 1.0  # after a failure, read the client's remaining input this long before answering
VOCODER_KEEPALIVE_MS = 10_000  # ping the vocoder link when quiet; no answer in half that: UNAVAILABLE (tests/reliability)
_NOTHING = object()


class _Failure(Exception):
    """Ends a stream with ``code`` and a message a person understands."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass
class SamplingDefaults:
    """Upstream Chatterbox-Turbo's defaults (ChatterboxTurboTTS.generate)."""

    temperature: float = 0.8
    top_k: int = 1000
    top_p: float = 0.95
    repetition_penalty: float = 1.2


def _default_sampling_factory() -> Callable[..., Any]:
    from token_service.engine import SamplingParams

    return SamplingParams


class TokenServicer(token_service_pb2_grpc.TokenServiceServicer):
    """TokenService over a token engine (docs/ARCHITECTURE.md contract) and a vocoder channel.

    Args:
        engine: the T3 engine (``voices``, ``tokenize``, ``generate``, ``stats``).
        vocoder_channel: a ``grpc.aio.Channel`` to the vocoder service.
        vocoder_target: its address, for error messages.
        vocoder_min_tokens / vocoder_max_wait_ms: a token message to the vocoder waits (at most
            ``vocoder_max_wait_ms``) until it holds ``vocoder_min_tokens`` tokens; the end of the
            input sends at once. 1 / 0: every token chunk goes out as it comes.
        make_sampling: ``(**fields) -> SamplingParams`` of the engine; default the engine's class.
    """

    def __init__(
        self,
        engine,
        vocoder_channel: grpc.aio.Channel,
        *,
        vocoder_target: str = "",
        telemetry: Telemetry | None = None,
        max_streams: int = 64,
        max_text_chars: int = 20000,
        max_new_tokens: int = 1000,
        make_sampling: Callable[..., Any] | None = None,
        vocoder_min_tokens: int = 1,
        vocoder_max_wait_ms: float = 0.0,
    ):
        self.engine = engine
        self.vocoder_min_tokens = max(1, vocoder_min_tokens)
        self.vocoder_max_wait_s = max(0.0, vocoder_max_wait_ms) / 1000
        self.vocoder = vocoder_service_pb2_grpc.VocoderServiceStub(vocoder_channel)
        self.vocoder_target = vocoder_target
        self.telemetry = telemetry or Telemetry("token-service")
        self.admission = Admission(max_streams, "token service streams (TTS_MAX_STREAMS)")
        self.max_text_chars = max_text_chars
        self.max_new_tokens = max_new_tokens
        self._make_sampling = make_sampling
        m, tel = self.telemetry.meter, self.telemetry
        self.m_ttfa = m.create_histogram("tts.time_to_first_audio", unit="s",
                                         description="first text piece to first audio chunk, per Synthesize stream")
        self.m_rtf = m.create_histogram("tts.real_time_factor", unit="1",
                                        description="stream seconds / audio seconds, per Synthesize stream")
        self.m_tps = m.create_histogram("tts.t3.tokens_per_second", unit="1/s",
                                        description="speech tokens per second of T3 decoding, per sentence")
        self.m_streams = m.create_counter("tts.streams", description="finished streams by rpc and status")
        tel.gauge("tts.streams.active", lambda: self.admission.active, "open Synthesize/StreamTokens streams")
        tel.gauge("tts.t3.kv_slots.active", lambda: self.engine.stats()["active"],
                  "KV-cache slots in use (leak gauge: 0 when idle)")

    # ---------------------------------------------------------------- helpers
    def stats(self) -> dict[str, Any]:
        """Open streams plus the engine's stats (what the leak gauges report)."""
        return {"active_streams": self.admission.active, "refused_streams": self.admission.refused,
                **self.engine.stats()}

    def _voice(self, name: str) -> str:
        voices = self.engine.voices()
        voice = name or ("default" if "default" in voices else voices[0])
        if voice not in voices:
            raise _Failure(grpc.StatusCode.NOT_FOUND, f"unknown voice {voice!r}; available voices: {', '.join(voices)}")
        return voice

    def _sampling(self, cfg: token_service_pb2.SamplingConfig, sentence_index: int):
        """SamplingParams for sentence ``sentence_index`` (seed + index when seeded)."""
        d = SamplingDefaults()
        fields: dict[str, Any] = {
            "temperature": cfg.temperature if cfg.HasField("temperature") else d.temperature,
            "top_k": cfg.top_k if cfg.HasField("top_k") else d.top_k,
            "top_p": cfg.top_p if cfg.HasField("top_p") else d.top_p,
            "repetition_penalty": cfg.repetition_penalty if cfg.HasField("repetition_penalty") else d.repetition_penalty,
            "max_new_tokens": min(cfg.max_new_tokens or self.max_new_tokens, self.max_new_tokens),
            "seed": cfg.seed + sentence_index if cfg.HasField("seed") else None,
        }
        if self._make_sampling is None:
            self._make_sampling = _default_sampling_factory()
        return self._make_sampling(**fields)

    def _check_sampling(self, cfg: token_service_pb2.SamplingConfig) -> None:
        """Reject impossible sampling values (the engine's own rules, checked before anything starts)."""
        problems = []
        if cfg.HasField("temperature") and not (cfg.temperature >= 0 and math.isfinite(cfg.temperature)):
            problems.append(f"temperature must be >= 0, got {cfg.temperature}")
        if cfg.HasField("top_p") and not 0 <= cfg.top_p <= 1:
            problems.append(f"top_p must be in [0, 1], got {cfg.top_p}")
        if cfg.HasField("repetition_penalty") and not (cfg.repetition_penalty > 0 and math.isfinite(cfg.repetition_penalty)):
            problems.append(f"repetition_penalty must be > 0, got {cfg.repetition_penalty}")
        if problems:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, "bad sampling config: " + "; ".join(problems))
        try:
            self._sampling(cfg, 0)
        except ValueError as exc:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, f"bad sampling config: {exc}") from None

    def _tokenize(self, sentence: str, index: int) -> list[int]:
        try:
            ids = self.engine.tokenize(sentence)
        except ValueError as exc:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, f"sentence {index} ({_preview(sentence)}): {exc}") from None
        if not ids:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, f"sentence {index} ({_preview(sentence)}) has no tokens")
        return list(ids)

    async def _admit(self, context) -> None:
        reason = self.admission.try_enter()
        if reason is not None:
            code = grpc.StatusCode.UNAVAILABLE if self.admission.draining else grpc.StatusCode.RESOURCE_EXHAUSTED
            log.warning("stream refused", extra={"reason": reason})
            await context.abort(code, f"token service {reason}")

    async def _generate(self, voice: str, ids: list[int], sampling, span_parent, index: int) -> AsyncIterator[list[int]]:
        """The engine's token stream with prefill/decode spans; always closes the engine stream."""
        tracer = self.telemetry.tracer
        ctx = trace.set_span_in_context(span_parent)
        sent_span = tracer.start_span("t3.sentence", context=ctx,
                                      attributes={"tts.sentence": index, "tts.text_tokens": len(ids)})
        sctx = trace.set_span_in_context(sent_span)
        try:
            stream = self.engine.generate(voice, ids, sampling)
        except ValueError as exc:  # e.g. text + max_new_tokens do not fit a KV slot
            sent_span.end()
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, f"sentence {index}: {exc}") from None
        t_prev = time.time_ns()
        t_first = None
        n = chunk = 0
        tokens: list[int] = []
        try:
            async for tokens in stream:
                now = time.time_ns()
                name = "t3.prefill" if chunk == 0 else "t3.decode"
                s = tracer.start_span(name, context=sctx, start_time=t_prev,
                                      attributes={"tts.tokens": len(tokens), "tts.chunk": chunk})
                s.end(end_time=now)
                t_first = t_first or now
                t_prev = now
                chunk += 1
                n += len(tokens)
                yield tokens
            if n > len(tokens) and t_first is not None and t_prev > t_first:
                self.m_tps.record((n - len(tokens)) / ((t_prev - t_first) / 1e9))
        except RuntimeError as exc:
            if type(exc).__name__ == "EngineOverloaded":
                raise _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, f"token engine is overloaded: {exc}") from None
            raise
        finally:
            await stream.aclose()
            sent_span.set_attribute("tts.speech_tokens", n)
            sent_span.end()

    # ---------------------------------------------------------------- RPCs
    async def ListVoices(self, request, context):
        voices = self.engine.voices()
        default = "default" if "default" in voices else (voices[0] if voices else "")
        return common_pb2.ListVoicesResponse(voices=[common_pb2.Voice(name=v) for v in voices], default_voice=default)

    async def StreamTokens(self, request, context):
        await self._admit(context)
        parent = context_from_metadata(context.invocation_metadata())
        span = self.telemetry.tracer.start_span("tts.StreamTokens", context=parent, kind=SpanKind.SERVER)
        status = "OK"
        try:
            with trace.use_span(span, end_on_exit=False):
                try:
                    voice = self._voice(request.voice)
                    self._check_sampling(request.sampling)
                    text = request.text
                    if not text.strip():
                        raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, "text is empty: nothing to synthesize")
                    if len(text) > self.max_text_chars:
                        raise _Failure(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"text is too long: {len(text)} characters, the limit is {self.max_text_chars}")
                    sentences = split_sentences(text)
                    token_ids = [self._tokenize(s, i) for i, s in enumerate(sentences)]
                except _Failure as f:
                    status = f.code.name
                    await context.abort(f.code, f.message)
                for i, ids in enumerate(token_ids):
                    async for tokens in self._generate(voice, ids, self._sampling(request.sampling, i), span, i):
                        yield token_service_pb2.StreamTokensResponse(token_ids=tokens, sentence_index=i)
                    yield token_service_pb2.StreamTokensResponse(token_ids=SILENCE_TOKENS, sentence_index=i)
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            status = "INTERNAL"
            log.exception("StreamTokens failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"token service failed: {type(exc).__name__}: {exc}")
        finally:
            self.admission.leave()
            if status != "OK":
                span.set_status(Status(StatusCode.ERROR, status))
            span.end()
            self.m_streams.add(1, {"rpc": "StreamTokens", "status": status})

    async def Synthesize(self, request_iterator, context):
        await self._admit(context)
        parent = context_from_metadata(context.invocation_metadata())
        span = self.telemetry.tracer.start_span("tts.Synthesize", context=parent, kind=SpanKind.SERVER)
        run = _Synthesis(self, request_iterator, context, span)
        try:
            with trace.use_span(span, end_on_exit=False):
                async for message in run.run():
                    yield message
        except asyncio.CancelledError:
            run.status = "CANCELLED"
            raise
        except _Failure as f:
            run.status = f.code.name
            await run.cleanup()
            await run.drain_requests(DRAIN_INPUT_S)
            await context.abort(f.code, f.message)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            run.status = "INTERNAL"
            log.exception("Synthesize failed")
            await run.cleanup()
            await context.abort(grpc.StatusCode.INTERNAL, f"token service failed: {type(exc).__name__}: {exc}")
        finally:
            await run.cleanup()
            self.admission.leave()
            run.finish_span()
            self.m_streams.add(1, {"rpc": "Synthesize", "status": run.status})
            log.info("synthesize finished", extra=run.log_fields())


class _Synthesis:
    """State and tasks of one Synthesize stream (see the module docstring)."""

    def __init__(self, servicer: TokenServicer, requests, context, span):
        self.s = servicer
        self.requests = requests
        self.context = context
        self.span = span
        self.status = "OK"
        self.sentences: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
        self.to_vocoder: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
        self.out: asyncio.Queue = asyncio.Queue(OUT_QUEUE_CHUNKS)
        self.failed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.tasks: list[asyncio.Task] = []
        self.call = None
        self.vocoder_span = None
        self.voice = ""
        self.n_sentences = self.text_tokens = self.speech_tokens = 0
        self.sentence_ends: list[int] = []  # cumulative token count at the end of each sentence
        self.samples = self.chunks = 0
        self.t_first_text: float | None = None
        self.t_first_audio: float | None = None
        self.t_end: float | None = None

    # ---- the stream
    async def run(self) -> AsyncIterator[token_service_pb2.SynthesizeResponse]:
        first = await anext(aiter(self.requests), None)
        if first is None or first.WhichOneof("kind") != "config":
            got = "nothing" if first is None else (first.WhichOneof("kind") or "an empty message")
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the first Synthesize message must be a config (voice, sampling, audio format); got {got}")
        cfg = first.config
        self.voice = self.s._voice(cfg.voice)
        self.s._check_sampling(cfg.sampling)
        try:
            spec = resolve_format(cfg.audio_format.encoding, cfg.audio_format.sample_rate_hz)
        except ValueError as exc:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, f"bad audio format: {exc}") from None
        self.cfg, self.spec, self.encoder = cfg, spec, StreamEncoder(spec)
        self.span.set_attributes({"tts.voice": self.voice, "tts.encoding": spec.encoding, "tts.sample_rate": spec.sample_rate})

        self._open_vocoder()
        loop = asyncio.get_running_loop()
        for coro, name in ((self._read_text(), "read"), (self._run_t3(), "t3"), (self._relay(), "relay")):
            task = loop.create_task(coro, name=f"synthesize-{name}")
            task.add_done_callback(self._task_done)
            self.tasks.append(task)

        while True:
            item = await self._next_output()
            if item is None:
                break
            yield item
        self.t_end = time.perf_counter()
        yield token_service_pb2.SynthesizeResponse(summary=self._summary())

    async def _next_output(self):
        """The next message for the client, or None at the end; raises the first task failure."""
        if self.failed.done():
            raise self.failed.result()
        get = asyncio.ensure_future(self.out.get())
        try:
            done, _ = await asyncio.wait({get, self.failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
        if get in done:
            return get.result()
        raise self.failed.result()

    def _fail(self, failure: _Failure) -> None:
        if not self.failed.done():
            self.failed.set_result(failure)

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, _Failure):
            self._fail(exc)
        elif isinstance(exc, DecodeError):
            self._fail(_Failure(grpc.StatusCode.INVALID_ARGUMENT, f"a request message could not be parsed "
                                f"(text must be valid UTF-8): {exc}"))
        else:
            log.error("synthesis task failed", exc_info=exc)
            self._fail(_Failure(grpc.StatusCode.INTERNAL, f"token service failed: {type(exc).__name__}: {exc}"))

    # ---- task 1: client text -> sentences
    async def _read_text(self) -> None:
        splitter = SentenceSplitter()
        chars = 0
        index = 0

        async def emit(sentences: list[str]) -> None:
            nonlocal index
            for sentence in sentences:
                await self.sentences.put((index, sentence))
                index += 1

        async for req in self.requests:
            kind = req.WhichOneof("kind")
            if kind == "text":
                if self.t_first_text is None:
                    self.t_first_text = time.perf_counter()
                chars += len(req.text)
                if chars > self.s.max_text_chars:
                    raise _Failure(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"text is too long: more than {self.s.max_text_chars} characters in one stream "
                                   f"(TTS_MAX_TEXT_CHARS); split it into several streams")
                await emit(splitter.feed(req.text))
            elif kind == "flush":
                await emit(splitter.flush())
            elif kind == "end":
                break
            elif kind == "config":
                raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, "config sent twice: send it once, first")
            else:
                raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, "empty Synthesize message: set text, flush or end")
        await emit(splitter.flush())
        if index == 0:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, "text is empty: nothing to synthesize")
        await self.sentences.put(None)

    # ---- task 2: sentences -> T3 -> token chunks for the vocoder
    async def _run_t3(self) -> None:
        voc = vocoder_service_pb2
        while True:
            item = await self.sentences.get()
            if item is None:
                break
            index, sentence = item
            ids = self.s._tokenize(sentence, index)
            self.n_sentences += 1
            self.text_tokens += len(ids)
            sampling = self.s._sampling(self.cfg.sampling, index)
            async for tokens in self.s._generate(self.voice, ids, sampling, self.span, index):
                bad = [t for t in tokens if not 0 <= t < SPEECH_VOCAB_SIZE]
                if bad:  # the engine promises ids < 6561; never forward garbage to the vocoder
                    raise _Failure(grpc.StatusCode.INTERNAL, f"T3 engine produced speech token {bad[0]} (>= {SPEECH_VOCAB_SIZE})")
                self.speech_tokens += len(tokens)
                await self.to_vocoder.put(voc.VocodeRequest(tokens=voc.TokenChunk(token_ids=tokens)))
            self.speech_tokens += len(SILENCE_TOKENS)
            self.sentence_ends.append(self.speech_tokens)
            await self.to_vocoder.put(voc.VocodeRequest(tokens=voc.TokenChunk(token_ids=SILENCE_TOKENS)))
        await self.to_vocoder.put(voc.VocodeRequest(end=common_pb2.EndOfInput()))
        await self.to_vocoder.put(None)

    # ---- the vocoder call and task 3: vocoder audio -> client
    def _open_vocoder(self) -> None:
        voc = vocoder_service_pb2
        self.vocoder_span = self.s.telemetry.tracer.start_span(
            "vocoder.call", context=trace.set_span_in_context(self.span), kind=SpanKind.CLIENT,
            attributes={"rpc.service": "chatterbox.tts.v1.VocoderService", "server.address": self.s.vocoder_target})
        vcfg = voc.VocodeConfig(voice=self.voice)
        if self.cfg.sampling.HasField("seed"):
            vcfg.seed = self.cfg.sampling.seed

        async def requests():
            """Config, then the queued messages; token chunks already waiting are merged into one
            message (the vocoder's output does not depend on how tokens are split into pushes)."""
            # Write only once the vocoder admitted the stream (its initial metadata) or ended it: a write
            # racing a refusal makes grpc.aio report INTERNAL instead of the vocoder's status (grpc/grpc#36066).
            await self.call.initial_metadata()
            if self.call.done():
                return
            yield voc.VocodeRequest(config=vcfg)
            held = _NOTHING
            while True:
                msg = held if held is not _NOTHING else await self.to_vocoder.get()
                held = _NOTHING
                if msg is None:  # end of the queue
                    return
                if msg.WhichOneof("kind") == "tokens":
                    held = await self._gather_tokens(msg)
                yield msg

        self.call = self.s.vocoder.Vocode(
            requests(),
            timeout=self.context.time_remaining(),  # gRPC does not carry deadlines on by itself
            metadata=outgoing_metadata(ctx=trace.set_span_in_context(self.vocoder_span)),
        )

    async def _gather_tokens(self, msg) -> Any:
        """Extend the token message ``msg`` in place: first with every token chunk already queued,
        then, below ``vocoder_min_tokens`` tokens, with chunks arriving within ``vocoder_max_wait_ms``
        (fewer, larger messages for the vocoder: each costs it a gRPC read and an engine call).
        Returns the non-token message (or the queue's end, None) that stopped it, else _NOTHING."""
        while not self.to_vocoder.empty():
            nxt = self.to_vocoder.get_nowait()
            if nxt is None or nxt.WhichOneof("kind") != "tokens":
                return nxt
            msg.tokens.token_ids.extend(nxt.tokens.token_ids)
        need, wait = self.s.vocoder_min_tokens, self.s.vocoder_max_wait_s
        if len(msg.tokens.token_ids) >= need or wait <= 0:
            return _NOTHING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while len(msg.tokens.token_ids) < need:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:  # a cancelled get() leaves its item in the queue (it is taken only after the wait)
                nxt = await asyncio.wait_for(self.to_vocoder.get(), left)
            except asyncio.TimeoutError:
                break
            if nxt is None or nxt.WhichOneof("kind") != "tokens":
                return nxt  # a sentence's silence / end of input: send what we have, then it
            msg.tokens.token_ids.extend(nxt.tokens.token_ids)
        return _NOTHING

    async def _relay(self) -> None:
        synth = token_service_pb2
        try:
            async for resp in self.call:
                audio = np.frombuffer(resp.pcm_f32, dtype="<f4")
                data, n = self.encoder.encode(audio, last=resp.final)
                if n == 0:  # nothing playable yet (or an empty last message)
                    if resp.final:
                        break
                    continue
                if self.t_first_audio is None and n:
                    self.t_first_audio = time.perf_counter()
                sentence = self._sentence_of(resp.sample_offset)
                await self.out.put(synth.SynthesizeResponse(audio=synth.AudioChunk(
                    sequence=self.chunks, sample_offset=self.samples, sample_rate_hz=self.spec.sample_rate,
                    encoding=self.spec.encoding, data=data, sentence_index=sentence)))
                self.chunks += 1
                self.samples += n
                if resp.final:
                    break
        except grpc.aio.AioRpcError as err:
            raise self._vocoder_failure(err) from None
        else:
            await self.out.put(None)

    def _sentence_of(self, model_sample: int) -> int:
        token = model_sample // SAMPLES_PER_TOKEN
        for i, end in enumerate(self.sentence_ends):
            if token < end:
                return i
        return len(self.sentence_ends)

    def _vocoder_failure(self, err: grpc.aio.AioRpcError) -> _Failure:
        code, details = err.code(), err.details() or ""
        where = f"vocoder service at {self.s.vocoder_target}" if self.s.vocoder_target else "vocoder service"
        if code == grpc.StatusCode.INTERNAL and "Internal error from Core" in details:
            # a write raced with the end of the stream (grpc/grpc#36066): the link broke
            return _Failure(grpc.StatusCode.UNAVAILABLE, f"{where} ended the stream unexpectedly: {details}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
            return _Failure(grpc.StatusCode.UNAVAILABLE, f"{where} is unavailable or stopped mid-stream: {code.name}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return _Failure(code, f"deadline exceeded while waiting for the {where}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return _Failure(code, f"{where} is at capacity: {details}")
        if code == grpc.StatusCode.NOT_FOUND:
            return _Failure(code, f"{where}: {details}")
        return _Failure(grpc.StatusCode.INTERNAL, f"{where} failed: {code.name}: {details}")

    # ---- end of stream
    async def drain_requests(self, timeout: float) -> None:
        """Read (and drop) what the client is still sending, up to its end or ``timeout`` seconds.

        Ending the call while a grpc.aio client is still writing makes that client see
        ``INTERNAL: Internal error from Core`` instead of our status (grpc/grpc#36066); a client
        that has already sent its end marker is answered with the real status at once.
        """
        async def consume() -> None:
            async for req in self.requests:
                if req.WhichOneof("kind") == "end":
                    return

        try:
            await asyncio.wait_for(consume(), timeout)
        except Exception:  # timeout, a broken or already finished request stream: answer anyway
            pass

    async def cleanup(self) -> None:
        """Cancel the tasks (closing the T3 stream = KV slot) and the Vocode call (= vocoder session)."""
        for task in self.tasks:
            task.cancel()
        if self.call is not None:
            self.call.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    def _summary(self) -> token_service_pb2.SynthesisSummary:
        rate = self.spec.sample_rate
        audio_s = self.samples / rate
        t0 = self.t_first_text or self.t_end
        total = self.t_end - t0
        ttfa = (self.t_first_audio - t0) if self.t_first_audio else 0.0
        rtf = total / audio_s if audio_s else 0.0
        if self.t_first_audio:
            self.s.m_ttfa.record(ttfa)
        if audio_s:
            self.s.m_rtf.record(rtf)
        return token_service_pb2.SynthesisSummary(
            sentences=self.n_sentences, text_tokens=self.text_tokens, speech_tokens=self.speech_tokens,
            audio_samples=self.samples, sample_rate_hz=rate, audio_seconds=audio_s, audio_chunks=self.chunks,
            time_to_first_audio_seconds=ttfa, total_seconds=total, real_time_factor=rtf)

    def finish_span(self) -> None:
        attrs = {"tts.sentences": self.n_sentences, "tts.text_tokens": self.text_tokens,
                 "tts.speech_tokens": self.speech_tokens, "tts.audio_samples": self.samples, "tts.status": self.status}
        if self.vocoder_span is not None:
            if self.status != "OK":
                self.vocoder_span.set_status(Status(StatusCode.ERROR, self.status))
            self.vocoder_span.end()
        self.span.set_attributes(attrs)
        if self.status != "OK":
            self.span.set_status(Status(StatusCode.ERROR, self.status))
        self.span.end()

    def log_fields(self) -> dict[str, Any]:
        return {"status": self.status, "voice": self.voice, "sentences": self.n_sentences,
                "speech_tokens": self.speech_tokens, "audio_samples": self.samples}


def _preview(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


async def start_server(cfg, engine, telemetry: Telemetry, make_sampling=None) -> tuple[ServiceServer, TokenServicer]:
    """Build and start the server for ``cfg`` around ``engine``; returns it (``.port`` is bound).

    The vocoder channel is closed when the server stops (``server.on_stop``)."""
    # The vocoder sends at most 1 s of float32 audio a message (96 kB); the client limit must not
    # apply to this internal link, so it gets its own generous bound.
    # round_robin: with TTS_VOCODER_TARGET=dns:///<headless service> every vocoder pod gets streams
    # (gRPC's default pick_first would send them all to the first address).
    channel = grpc.aio.insecure_channel(cfg.vocoder_target, options=[
        ("grpc.max_receive_message_length", max(cfg.max_message_bytes, VOCODER_LINK_MAX_BYTES)),
        ("grpc.max_send_message_length", max(cfg.max_message_bytes, VOCODER_LINK_MAX_BYTES)),
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        # a frozen link (dead route, stuck peer) ends the streams on it instead of hanging them
        ("grpc.keepalive_time_ms", VOCODER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", VOCODER_KEEPALIVE_MS // 2),
        ("grpc.http2.ping_timeout_ms", VOCODER_KEEPALIVE_MS // 2),  # any unanswered ping (BDP ones too)
    ])
    servicer = TokenServicer(engine, channel, vocoder_target=cfg.vocoder_target, telemetry=telemetry,
                             max_streams=cfg.max_streams, max_text_chars=cfg.max_text_chars,
                             max_new_tokens=cfg.max_new_tokens, make_sampling=make_sampling,
                             vocoder_min_tokens=cfg.vocoder_min_tokens, vocoder_max_wait_ms=cfg.vocoder_max_wait_ms)
    server = ServiceServer("token-service", cfg.listen, cfg.max_message_bytes, [SERVICE_NAME])
    server.admissions.append(servicer.admission)
    server.on_stop.append(channel.close)
    token_service_pb2_grpc.add_TokenServiceServicer_to_server(servicer, server.grpc)
    await server.start()
    if cfg.stats_log_s > 0:  # TTS_STATS_LOG_S: engine statistics as JSON lines while busy, and at shutdown
        def stats() -> dict[str, Any]:
            timings = getattr(engine, "timings", None)  # the pytorch engine's thread seconds per phase
            mem = gpu_memory_mb()
            return {**servicer.stats(), **({"timings": timings()} if callable(timings) else {}),
                    **({"gpu_mem": mem} if mem else {})}

        stats_log = StatsLogger(stats, cfg.stats_log_s, logging.getLogger("token_service.stats"),
                                is_busy=lambda s: s["active_streams"] > 0)
        stats_log.start()
        server.on_stop.append(stats_log.stop)
    return server, servicer


async def serve(cfg, engine=None, telemetry: Telemetry | None = None) -> None:
    """Load the engine (unless given), serve on ``cfg.listen`` until SIGTERM, then drain."""

    def load_engine(cfg):
        from token_service.engine_loader import load_engine

        return load_engine(cfg)

    await serve_until_signal("token-service", cfg, engine, load_engine, start_server, telemetry)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tts-token-service` (flags and TTS_* env; see --help)."""
    from token_service.config import TokenServiceConfig

    return service_main("tts-token-service", "token-service", TokenServiceConfig, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
