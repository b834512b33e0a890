"""Async client helpers for the reliability tests (every call has a deadline; nothing here can hang)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from tts_api.v1 import common_pb2, token_service_pb2, token_service_pb2_grpc

MAX_NEW = 20  # the reliability servers' cap on speech tokens per sentence (conftest.py): small CPU time
LONG_TEXT = " ".join(f"This is sentence number {i}, spoken slowly and clearly." for i in range(12))


@dataclass
class Outcome:
    code: str  # "OK" or a status code name
    details: str = ""
    chunks: int = 0
    samples: int = 0
    summary: token_service_pb2.SynthesisSummary | None = None
    seconds: float = 0.0
    data: bytes = b""
    first_audio_s: float | None = None
    events: list = field(default_factory=list)


def config(seed: int = 1, max_new_tokens: int | None = None, voice: str = "") -> token_service_pb2.SynthesisConfig:
    sampling = token_service_pb2.SamplingConfig(seed=seed)
    if max_new_tokens:
        sampling.max_new_tokens = max_new_tokens
    return token_service_pb2.SynthesisConfig(voice=voice, sampling=sampling,
                                             audio_format=common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16))


def requests(text: str, cfg=None, words: int = 4, gap: float = 0.0):
    req = token_service_pb2.SynthesizeRequest

    async def gen():
        yield req(config=cfg or config())
        parts = text.split(" ")
        for i in range(0, len(parts), words):
            if i and gap:
                await asyncio.sleep(gap)
            yield req(text=" ".join(parts[i:i + words]) + " ")
        yield req(end=common_pb2.EndOfInput())

    return gen()


async def synthesize(target: str, text: str, *, timeout: float = 60.0, cfg=None, on_first_audio=None,
                     request_iter=None) -> Outcome:
    """One Synthesize stream to the end; the outcome, never an exception for gRPC errors."""
    t0 = time.perf_counter()
    out = Outcome(code="PENDING")
    async with grpc.aio.insecure_channel(target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        call = stub.Synthesize(request_iter if request_iter is not None else requests(text, cfg), timeout=timeout)
        try:
            async for resp in call:
                if resp.WhichOneof("kind") == "audio":
                    if out.first_audio_s is None:
                        out.first_audio_s = time.perf_counter() - t0
                        if on_first_audio is not None:
                            on_first_audio()
                    out.chunks += 1
                    out.samples += len(resp.audio.data) // 2
                    out.data += resp.audio.data
                else:
                    out.summary = resp.summary
            out.code = "OK"
        except grpc.aio.AioRpcError as err:
            out.code, out.details = err.code().name, err.details() or ""
    out.seconds = time.perf_counter() - t0
    return out


async def start_streams(target: str, text: str, seeds, *, gap: float, words: int = 3, timeout: float = 60.0,
                        wait: float = 30.0) -> list[asyncio.Future]:
    """Start one Synthesize stream per seed whose ``text`` arrives ``words`` at a time every ``gap``
    seconds (LLM pace); return their running outcomes (futures) once every one has sent audio, or
    raise ``TimeoutError`` after ``wait`` seconds."""
    seeds = list(seeds)
    waiting = len(seeds)
    all_audio = asyncio.Event()

    def first_audio() -> None:
        nonlocal waiting
        waiting -= 1
        if waiting == 0:
            all_audio.set()

    flights = [asyncio.ensure_future(synthesize(target, "", timeout=timeout, on_first_audio=first_audio,
                                                request_iter=requests(text, config(seed=s), words=words, gap=gap)))
               for s in seeds]
    await asyncio.wait_for(all_audio.wait(), wait)
    return flights


def run(coro, timeout: float = 120.0):
    """Run ``coro`` on a fresh loop, bounded by ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def wait_until(pred, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def sync_synthesize(target: str, text: str, *, timeout: float = 60.0, cfg=None) -> Outcome:
    """The same with the synchronous client (grpc.Channel). Use it where the server ends a stream
    while the client may still be writing (a refusal): grpc's asyncio client then reports INTERNAL
    "Internal error from Core" instead of the server's status (grpc/grpc#36066); the sync client
    reports the server's status."""
    from tts_client.client import synthesize as client_synthesize

    t0 = time.perf_counter()
    with grpc.insecure_channel(target) as ch:
        try:
            r = client_synthesize(ch, text, cfg or config(), timeout=timeout)
        except grpc.RpcError as err:
            return Outcome(code=err.code().name, details=err.details() or "", seconds=time.perf_counter() - t0)
    return Outcome(code="OK", chunks=len(r.chunks), samples=r.samples, summary=r.summary, data=r.data,
                   first_audio_s=r.first_audio_seconds, seconds=time.perf_counter() - t0)


def same_audio(a: bytes, b: bytes, max_step: int = 32) -> bool:
    """Two PCM16 streams of equal length whose samples differ by at most ``max_step`` (float rounding
    under different batching moves a few steps; different speech tokens would move thousands)."""
    import numpy as np

    x, y = np.frombuffer(a, "<i2").astype(int), np.frombuffer(b, "<i2").astype(int)
    return x.shape == y.shape and x.size > 0 and int(np.abs(x - y).max()) <= max_step
