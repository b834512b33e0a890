"""`tts-vocoder-service`: the gRPC VocoderService around the streaming vocoder engine.

One ``Vocode`` stream = one engine session: config first (voice, seed; the session's backend is opened
at once, ``session.prepare()``, off the first chunk's path), then token chunks; each chunk
is pushed to the session and whatever audio became final is sent back at once (float32, 24 kHz), then
``finish()`` sends the rest. The handler is an async generator (the OpenTelemetry aio interceptor and
grpc's own bookkeeping both behave with that form); a cancelled or failed stream closes its session in
``finally``, so nothing leaks.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from tts_api.v1 import common_pb2, vocoder_service_pb2, vocoder_service_pb2_grpc
from tts_common.grpc_server import Admission, ServiceServer, serve_until_signal, service_main
from tts_common.gpu_memory import gpu_memory_mb
from tts_common.stats_log import StatsLogger
from tts_common.telemetry import Telemetry, context_from_metadata
from vocoder_service.engine import SAMPLE_RATE, SPEECH_VOCAB_SIZE, UnknownVoiceError

log = logging.getLogger("vocoder_service.server")

SERVICE_NAME = vocoder_service_pb2.DESCRIPTOR.services_by_name["VocoderService"].full_name


class VocoderServicer(vocoder_service_pb2_grpc.VocoderServiceServicer):
    """Handlers of VocoderService over an engine with the vocoder contract (docs/ARCHITECTURE.md)."""

    def __init__(self, engine, telemetry: Telemetry | None = None, max_streams: int = 128):
        self.engine = engine
        self.telemetry = telemetry or Telemetry("vocoder-service")
        self.admission = Admission(max_streams, "vocoder streams (TTS_MAX_STREAMS)")
        meter, tel = self.telemetry.meter, self.telemetry
        self._chunk_seconds = meter.create_histogram(
            "tts.vocoder.chunk.duration", unit="s", description="compute time of one token chunk")
        self._rtf = meter.create_histogram(
            "tts.vocoder.real_time_factor", unit="1", description="vocoder compute seconds per audio second, per stream")
        self._streams = meter.create_counter("tts.vocoder.streams", description="finished Vocode streams by status")
        tel.gauge("tts.vocoder.streams.active", lambda: self.admission.active, "open Vocode streams")
        tel.gauge("tts.vocoder.sessions.active", lambda: self.engine.stats()["active_sessions"],
                  "open vocoder engine sessions (leak gauge: 0 when idle)")

    def stats(self) -> dict[str, Any]:
        """Open streams and engine counters (what the leak gauges report)."""
        return {"active_streams": self.admission.active, "refused_streams": self.admission.refused,
                **self.engine.stats()}

    async def ListVoices(self, request, context):
        voices = self.engine.voices()
        return common_pb2.ListVoicesResponse(
            voices=[common_pb2.Voice(name=v) for v in voices], default_voice=voices[0] if voices else "")

    async def Vocode(self, request_iterator: AsyncIterator, context: grpc.aio.ServicerContext):
        reason = self.admission.try_enter()
        if reason is not None:
            code = grpc.StatusCode.UNAVAILABLE if self.admission.draining else grpc.StatusCode.RESOURCE_EXHAUSTED
            log.warning("vocode refused", extra={"reason": reason})
            await context.abort(code, f"vocoder service {reason}")
        parent = context_from_metadata(context.invocation_metadata())
        span = self.telemetry.tracer.start_span("vocoder.Vocode", context=parent, kind=SpanKind.SERVER)
        remaining = context.time_remaining()
        if remaining is not None and remaining < 1e9:  # the caller's deadline, passed on by the token service
            span.set_attribute("rpc.deadline_remaining_s", float(remaining))
        session = None
        started = time.perf_counter()
        compute = 0.0
        tokens = samples = 0
        status = "OK"
        try:
            with trace.use_span(span, end_on_exit=False):
                # admitted: say so at once; the token service writes only after this, so a refused call
                # shows it our status instead of a failed write (grpc/grpc#36066; tests/reliability)
                await context.send_initial_metadata(())
                first = await anext(aiter(request_iterator), None)
                if first is None:
                    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                 "empty Vocode stream: the first message must be a config")
                if first.WhichOneof("kind") != "config":
                    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                 f"the first Vocode message must be a config, got {first.WhichOneof('kind') or 'an empty message'}")
                cfg = first.config
                seed = cfg.seed if cfg.HasField("seed") else None
                try:
                    session = self.engine.open_session(cfg.voice, seed=seed)
                except UnknownVoiceError as exc:
                    await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
                span.set_attribute("tts.voice", session.voice)
                prepare = getattr(session, "prepare", None)
                if prepare is not None:  # open the backend now, while the first tokens are being made
                    prepare()
                seq = 0
                async for req in request_iterator:
                    kind = req.WhichOneof("kind")
                    if kind == "end":
                        break
                    if kind != "tokens":
                        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                     "config sent twice" if kind == "config" else "empty Vocode message (set tokens or end)")
                    ids = list(req.tokens.token_ids)
                    for i, t in enumerate(ids):
                        if t >= SPEECH_VOCAB_SIZE:
                            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                         f"speech token id {t} (position {i} of chunk {seq}) is out of range: "
                                         f"ids must be < {SPEECH_VOCAB_SIZE}")
                    if not ids:  # an empty chunk adds nothing (the session itself rejects an empty push)
                        continue
                    t0 = time.perf_counter()
                    with self.telemetry.tracer.start_as_current_span(
                            "vocoder.chunk", attributes={"tts.tokens": len(ids), "tts.chunk": seq}):
                        audio = await session.push(ids)
                    dt = time.perf_counter() - t0
                    compute += dt
                    self._chunk_seconds.record(dt)
                    tokens += len(ids)
                    for piece in _pieces(audio):
                        yield _response(seq, samples, piece, tokens, False)
                        seq += 1
                        samples += piece.size
                t0 = time.perf_counter()
                with self.telemetry.tracer.start_as_current_span("vocoder.finish", attributes={"tts.tokens": tokens}):
                    audio = await session.finish()
                compute += time.perf_counter() - t0
                pieces = _pieces(audio) or [audio]
                for i, piece in enumerate(pieces):
                    yield _response(seq, samples, piece, tokens, i == len(pieces) - 1)
                    seq += 1
                    samples += piece.size
                if samples:
                    self._rtf.record(compute / (samples / SAMPLE_RATE))
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except DecodeError as exc:
            status = "INVALID_ARGUMENT"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a Vocode message could not be parsed: {exc}")
        except Exception as exc:
            status = _status_name(exc, context)
            if status == "INTERNAL":
                log.exception("vocode failed")
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                await context.abort(grpc.StatusCode.INTERNAL, f"vocoder failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            if session is not None:
                session.close()
            self.admission.leave()
            span.set_attribute("tts.tokens", tokens)
            span.set_attribute("tts.samples", samples)
            span.set_attribute("tts.status", status)
            if status != "OK":
                span.set_status(Status(StatusCode.ERROR, status))
            span.end()
            self._streams.add(1, {"status": status})
            log.info("vocode finished", extra={"status": status, "tokens": tokens, "samples": samples,
                                               "seconds": round(time.perf_counter() - started, 4)})


MAX_CHUNK_SAMPLES = SAMPLE_RATE  # one message carries at most 1 s of audio (96 kB), whatever a push returned


def _pieces(audio) -> list:
    """``audio`` (N,) split into pieces of at most MAX_CHUNK_SAMPLES (none for N = 0)."""
    return [audio[i:i + MAX_CHUNK_SAMPLES] for i in range(0, audio.size, MAX_CHUNK_SAMPLES)]


def _response(seq: int, offset: int, audio, tokens: int, final: bool) -> vocoder_service_pb2.VocodeResponse:
    return vocoder_service_pb2.VocodeResponse(
        sequence=seq, sample_offset=offset, sample_rate_hz=SAMPLE_RATE,
        pcm_f32=audio.astype("<f4").tobytes(), tokens_received=tokens, final=final)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    log.info("vocode rejected", extra={"code": code.name, "reason": message})
    await context.abort(code, message)


def _status_name(exc: BaseException, context) -> str:
    """The status a failed handler ends with: the one it aborted with, else INTERNAL."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(exc, grpc.aio.AbortError) or code not in (None, grpc.StatusCode.OK):
        return getattr(code, "name", "ABORTED") if code is not None else "ABORTED"
    return "INTERNAL"


async def start_server(cfg, engine, telemetry: Telemetry) -> tuple[ServiceServer, VocoderServicer]:
    """Build and start the server for ``cfg`` around ``engine``; returns it (``.port`` is bound)."""
    servicer = VocoderServicer(engine, telemetry, cfg.max_streams)
    server = ServiceServer("vocoder-service", cfg.listen, cfg.max_message_bytes, [SERVICE_NAME])
    server.admissions.append(servicer.admission)
    vocoder_service_pb2_grpc.add_VocoderServiceServicer_to_server(servicer, server.grpc)
    await server.start()
    if cfg.stats_log_s > 0:  # TTS_STATS_LOG_S: engine statistics as JSON lines while busy, and at shutdown
        if hasattr(engine, "stats_window_s"):
            engine.stats_window_s = cfg.stats_log_s  # each line's percentiles cover the time since the last
        def stats() -> dict[str, Any]:
            mem = gpu_memory_mb()
            return {**servicer.stats(), **({"gpu_mem": mem} if mem else {})}

        stats_log = StatsLogger(stats, cfg.stats_log_s, logging.getLogger("vocoder_service.stats"),
                                is_busy=lambda s: s["active_streams"] > 0)
        stats_log.start()
        server.on_stop.append(stats_log.stop)
    return server, servicer


async def serve(cfg, engine=None, telemetry: Telemetry | None = None) -> None:
    """Load the engine (unless given), serve on ``cfg.listen`` until SIGTERM, then drain."""

    def load_engine(cfg):
        from vocoder_service.engine.loader import load_engine

        return load_engine(cfg)

    await serve_until_signal("vocoder-service", cfg, engine, load_engine, start_server, telemetry)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tts-vocoder-service` (flags and TTS_* env; see --help)."""
    from vocoder_service.config import VocoderServiceConfig

    return service_main("tts-vocoder-service", "vocoder-service", VocoderServiceConfig, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
