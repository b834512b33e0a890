"""A small synchronous client of the token service (what `tts-client` and `make demo` use).

    with grpc.insecure_channel("localhost:50051") as channel:
        result = synthesize(channel, "Hello there. How are you?", stream_text=True)
        open("out.wav", "wb").write(result.wav())

With ``stream_text`` the text goes out a few words at a time with a short pause, as an LLM would send
it; otherwise as one piece. The call runs inside a client span whose context travels in the metadata,
so client, token service and vocoder service share one trace.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from tts_api.v1 import common_pb2, token_service_pb2, token_service_pb2_grpc
from tts_common.audio import ENCODING_NAMES, decode_samples, wav_bytes
from tts_common.telemetry import Telemetry, outgoing_metadata, trace_id_hex

ENCODINGS = {"pcm16": 1, "float32": 2, "mulaw": 3}


@dataclass
class SynthesisResult:
    """What came back: the audio bytes as sent, per-chunk info, the server's summary, client timings."""

    encoding: int
    sample_rate: int
    data: bytes = b""
    chunks: list[token_service_pb2.AudioChunk] = field(default_factory=list)
    summary: token_service_pb2.SynthesisSummary | None = None
    first_audio_seconds: float | None = None  # client-side: request start -> first audio chunk
    total_seconds: float = 0.0
    trace_id: str = ""

    @property
    def samples(self) -> int:
        return sum(_n_samples(c) for c in self.chunks)

    def audio(self):
        """float32 samples (N,) in [-1, 1]."""
        return decode_samples(self.data, self.encoding)

    def wav(self) -> bytes:
        return wav_bytes(self.data, self.encoding, self.sample_rate)


def _n_samples(chunk: token_service_pb2.AudioChunk) -> int:
    return len(chunk.data) // {1: 2, 2: 4, 3: 1}.get(chunk.encoding, 2)


def text_pieces(text: str, words_per_piece: int = 3) -> list[str]:
    """Split text into pieces of a few words each (keeping the spaces), as an LLM streams it."""
    words = text.split(" ")
    return [" ".join(words[i:i + words_per_piece]) + (" " if i + words_per_piece < len(words) else "")
            for i in range(0, len(words), words_per_piece)]


def synthesis_requests(
    text: str,
    config: token_service_pb2.SynthesisConfig,
    stream_text: bool = False,
    words_per_piece: int = 3,
    piece_interval: float = 0.05,
) -> Iterator[token_service_pb2.SynthesizeRequest]:
    """The request stream: config, text (one piece or word groups with pauses), end."""
    req = token_service_pb2.SynthesizeRequest
    yield req(config=config)
    pieces = text_pieces(text, words_per_piece) if stream_text else [text]
    for i, piece in enumerate(pieces):
        if i and stream_text:
            time.sleep(piece_interval)
        yield req(text=piece)
    yield req(end=common_pb2.EndOfInput())


def make_config(
    voice: str = "",
    encoding: str = "pcm16",
    sample_rate: int = 0,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
) -> token_service_pb2.SynthesisConfig:
    """A SynthesisConfig from plain values (``encoding``: pcm16, float32 or mulaw)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown format {encoding!r}; use one of {', '.join(ENCODINGS)}")
    sampling = token_service_pb2.SamplingConfig()
    if seed is not None:
        sampling.seed = seed
    if max_new_tokens is not None:
        sampling.max_new_tokens = max_new_tokens
    if temperature is not None:
        sampling.temperature = temperature
    return token_service_pb2.SynthesisConfig(
        voice=voice, sampling=sampling,
        audio_format=common_pb2.AudioFormat(encoding=ENCODINGS[encoding], sample_rate_hz=sample_rate))


def synthesize(
    channel: grpc.Channel,
    text: str,
    config: token_service_pb2.SynthesisConfig | None = None,
    *,
    stream_text: bool = False,
    words_per_piece: int = 3,
    piece_interval: float = 0.05,
    timeout: float | None = None,
    telemetry: Telemetry | None = None,
    on_chunk: Callable[[token_service_pb2.AudioChunk], None] | None = None,
) -> SynthesisResult:
    """Run one Synthesize stream to the end. Raises ``grpc.RpcError`` with the server's status."""
    config = config or make_config()
    telemetry = telemetry or Telemetry("tts-client")
    stub = token_service_pb2_grpc.TokenServiceStub(channel)
    enc = config.audio_format.encoding or 1
    result = SynthesisResult(encoding=enc, sample_rate=config.audio_format.sample_rate_hz)
    parts: list[bytes] = []
    with telemetry.tracer.start_as_current_span("tts.client.synthesize", kind=SpanKind.CLIENT,
                                                record_exception=False, set_status_on_exception=False) as span:
        result.trace_id = trace_id_hex(span)
        t0 = time.perf_counter()
        responses = stub.Synthesize(
            synthesis_requests(text, config, stream_text, words_per_piece, piece_interval),
            timeout=timeout, metadata=outgoing_metadata())
        try:
            for resp in responses:
                if resp.WhichOneof("kind") == "audio":
                    if result.first_audio_seconds is None:
                        result.first_audio_seconds = time.perf_counter() - t0
                    result.chunks.append(resp.audio)
                    result.sample_rate, result.encoding = resp.audio.sample_rate_hz, resp.audio.encoding
                    parts.append(resp.audio.data)
                    if on_chunk is not None:
                        on_chunk(resp.audio)
                else:
                    result.summary = resp.summary
        except grpc.RpcError as err:
            span.set_status(Status(StatusCode.ERROR, f"{err.code().name}: {err.details()}"))
            raise
        result.total_seconds = time.perf_counter() - t0
    result.data = b"".join(parts)
    return result


def list_voices(channel: grpc.Channel, timeout: float | None = 10.0) -> common_pb2.ListVoicesResponse:
    return token_service_pb2_grpc.TokenServiceStub(channel).ListVoices(common_pb2.ListVoicesRequest(), timeout=timeout)


def encoding_name(encoding: int) -> str:
    return ENCODING_NAMES.get(encoding, str(encoding))
