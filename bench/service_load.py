"""Load generator for the service pair: N concurrent ``Synthesize`` streams, text sent as an LLM sends it.

    python -m bench.service_load --target 127.0.0.1:50051 --concurrency 1,8,32 --requests 200
    python -m bench.service_load --spawn .cache/test-demo/tiny-... --device cpu --concurrency 1,4 --requests 1000

``--target`` drives running services (``--server-pids`` adds their resident memory); ``--spawn DIR``
starts both services on loopback itself (free ports) and stops them at the end. Only loopback targets
are accepted (``--allow-remote`` lifts that). Prints a table, then one JSON object.

What a stream does (``StreamSpec``): one config (PCM16, 24 kHz, seed = request index, optional
``max_new_tokens`` cap per sentence), then its text — one or two sentences — in pieces of
``words_per_piece`` words, ``piece_gap_s`` apart, then end-of-input. Every stream has a gRPC deadline
(``deadline_s``); a level stops starting streams after ``level_time_s``; so every run is bounded.

Per stream (``StreamRecord``), times from ``time.perf_counter()``:

* ``ttfa_s`` — time to first audio: first audio chunk received minus the moment the client sent the
  piece that completes the first sentence (terminal punctuation + space; the server's splitter
  releases such a sentence at once). This is the latency the services add: client → token service →
  vocoder service → client. ``ttfa_from_first_text_s`` is measured from the first text piece (what a
  listener feels while an LLM is still writing the first sentence; the server's summary reports this one).
* ``chunks`` — every audio chunk's arrival time (seconds after the stream opened) and audio duration.
* underruns — a player starts at the first chunk's arrival ``a0`` and plays chunks back to back. Its
  clock ``play_end`` (when the audio received so far runs out) starts at ``a0 + d0``. For each later
  chunk ``k`` (arrival ``a_k``, duration ``d_k``): if ``a_k > play_end + tolerance`` the player ran
  dry — one underrun, stalled ``a_k - play_end`` seconds, and it resumes with this chunk
  (``play_end = a_k + d_k``); otherwise ``play_end += d_k``. So one late chunk counts once, not again
  for every chunk after it. ``tolerance`` is 0 unless given.
* ``status`` — ``OK`` or the gRPC status code name (``details`` keeps the server's message).

Per level (``summarize``): streams held (the most streams at once that had started receiving audio and
had not ended), p50/p99 TTFA, underrun count and streams with any underrun, aggregate audio seconds
per wall second, errors by status code, and the resident memory (VmRSS from /proc) of the server
processes before and after the level.

``services_section(model_dir, sweep, results)`` is the GPU bench's entry (bench/gpu_bench.py): it
starts both services as processes, measures TTFA at concurrency 1, runs the sweep, samples GPU memory
per process (nvidia-smi) and writes ``results["services"]``. It runs on CPU as well (tiny preset).

Shared with bench/vocoder_load.py (its ``Vocode`` streams): ``read_responses`` (one call's responses,
status and end), ``run_streams`` (one level of any streaming RPC, given the per-stream coroutine),
``sweep_levels`` (warm-up, then the levels, cut by time), ``summarize``, and the CLI's
``load_arg_parser`` / ``print_results``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.engine_stats import SETTLE_MARGIN_S
from tts_client.health import wait_healthy

ROOT = Path(__file__).resolve().parents[1]

SENTENCES = [
    "Hello there, thanks for calling today.",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming speech starts before the text is complete.",
    "Please hold while I look up your order number.",
    "Your package should arrive early next week.",
    "Is there anything else I can help you with?",
    "The weather tomorrow looks sunny and warm.",
    "Let me read that back to you once more.",
]
PCM16_BYTES = 2
CPU_MAX_LEVEL = 16  # services_section on CPU: higher sweep levels are skipped (recorded in the results)
SAMPLE_RATE = 24_000


# ------------------------------------------------------------------------------------- records
@dataclasses.dataclass
class StreamSpec:
    """How each stream of a run behaves (see the module docstring)."""

    sentences: int = 0  # sentences per stream; 0 = alternate 1 and 2
    words_per_piece: int = 3
    piece_gap_s: float = 0.03
    max_new_tokens: int | None = None  # cap per sentence (random weights never stop by themselves)
    deadline_s: float = 60.0
    voice: str = ""

    def text(self, index: int) -> str:
        n = self.sentences or (1 + index % 2)
        return " ".join(SENTENCES[(index + k) % len(SENTENCES)] for k in range(n))


@dataclasses.dataclass
class StreamRecord:
    """What one stream saw. Times are seconds after ``opened`` (a perf_counter value)."""

    index: int
    opened: float = 0.0
    first_text: float | None = None
    sentence_ready: float | None = None  # the piece completing the first sentence was sent
    first_audio: float | None = None
    ended: float | None = None
    chunks: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (arrival, audio seconds)
    status: str = "PENDING"
    details: str = ""
    summary_rtf: float | None = None

    @property
    def ttfa_s(self) -> float | None:
        if self.first_audio is None or self.sentence_ready is None:
            return None
        return self.first_audio - self.sentence_ready

    @property
    def ttfa_from_first_text_s(self) -> float | None:
        if self.first_audio is None or self.first_text is None:
            return None
        return self.first_audio - self.first_text

    @property
    def audio_s(self) -> float:
        return sum(d for _, d in self.chunks)

    def underruns(self, tolerance: float = 0.0) -> tuple[int, float]:
        return count_underruns(self.chunks, tolerance)


def count_underruns(chunks: Sequence[tuple[float, float]], tolerance: float = 0.0) -> tuple[int, float]:
    """(underruns, stalled seconds) of a player fed ``chunks`` = [(arrival, duration), ...] in order.

    Playback starts at the first chunk's arrival; see the module docstring for the exact rule."""
    if not chunks:
        return 0, 0.0
    a0, d0 = chunks[0]
    play_end = a0 + d0
    count, stalled = 0, 0.0
    for arrival, duration in chunks[1:]:
        if arrival > play_end + tolerance:
            count += 1
            stalled += arrival - play_end
            play_end = arrival + duration
        else:
            play_end += duration
    return count, stalled


def pct(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank on the sorted values); nan for no values."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


# ---------------------------------------------------------------------------------- one stream
def text_pieces(text: str, words_per_piece: int) -> list[tuple[str, bool]]:
    """Pieces of a few words (spaces kept), each flagged True if it completes the first sentence."""
    words = text.split(" ")
    pieces, done = [], False
    for i in range(0, len(words), words_per_piece):
        piece = " ".join(words[i:i + words_per_piece]) + (" " if i + words_per_piece < len(words) else "")
        ends = not done and any(w.endswith((".", "!", "?")) for w in words[i:i + words_per_piece])
        done = done or ends
        pieces.append((piece, ends))
    if pieces and not done:  # no terminal punctuation: the end of input completes it
        pieces[-1] = (pieces[-1][0], True)
    return pieces


async def run_stream(stub, index: int, spec: StreamSpec, on_audio=None) -> StreamRecord:
    """One Synthesize stream as an LLM-fed client drives it; never raises for gRPC errors."""
    from tts_api.v1 import common_pb2, token_service_pb2

    req = token_service_pb2.SynthesizeRequest
    sampling = token_service_pb2.SamplingConfig(seed=index)
    if spec.max_new_tokens:
        sampling.max_new_tokens = spec.max_new_tokens
    config = token_service_pb2.SynthesisConfig(
        voice=spec.voice, sampling=sampling,
        audio_format=common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=SAMPLE_RATE))
    rec = StreamRecord(index=index, opened=time.perf_counter())
    t0 = rec.opened

    async def requests() -> AsyncIterator:
        yield req(config=config)
        for i, (piece, ends_sentence) in enumerate(text_pieces(spec.text(index), spec.words_per_piece)):
            if i:
                await asyncio.sleep(spec.piece_gap_s)
            now = time.perf_counter() - t0
            if rec.first_text is None:
                rec.first_text = now
            yield req(text=piece)
            if ends_sentence and rec.sentence_ready is None:
                rec.sentence_ready = now
        if rec.sentence_ready is None:
            rec.sentence_ready = time.perf_counter() - t0
        yield req(end=common_pb2.EndOfInput())

    def on_response(resp, now: float) -> None:
        if resp.WhichOneof("kind") == "audio":
            n = len(resp.audio.data) // PCM16_BYTES
            rate = resp.audio.sample_rate_hz or SAMPLE_RATE
            if rec.first_audio is None and n:
                rec.first_audio = now
                if on_audio is not None:
                    on_audio(rec)
            rec.chunks.append((now, n / rate))
        else:
            rec.summary_rtf = resp.summary.real_time_factor

    await read_responses(stub.Synthesize(requests(), timeout=spec.deadline_s), rec, on_response)
    return rec


async def read_responses(call, rec: StreamRecord, on_response: Callable[[Any, float], None]) -> None:
    """Read a streaming ``call`` to its end: ``on_response(resp, seconds after rec.opened)`` for each
    response, then ``rec.status`` = ``OK`` or the gRPC status code name (``rec.details``: the server's
    message) and ``rec.ended``. Never raises for gRPC errors; a cancelled task cancels the call."""
    try:
        async for resp in call:
            on_response(resp, time.perf_counter() - rec.opened)
        rec.status = "OK"
    except grpc.aio.AioRpcError as err:
        rec.status, rec.details = err.code().name, err.details() or ""
    except asyncio.CancelledError:
        call.cancel()
        rec.status = "CANCELLED_BY_CLIENT"
        raise
    finally:
        rec.ended = time.perf_counter() - rec.opened


# ------------------------------------------------------------------------------------ one level
@dataclasses.dataclass
class LevelResult:
    concurrency: int
    records: list[StreamRecord]
    wall_s: float
    held_max: int


def _channel_options() -> list[tuple[str, Any]]:
    # Own subchannel per channel, so streams spread over several TCP connections as real clients do.
    return [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 16 * 1024 * 1024)]


async def run_level(target: str, concurrency: int, requests: int, spec: StreamSpec, *, level_time_s: float = 120.0,
                    ramp_s: float = 0.0, first_index: int = 0, streams_per_channel: int = 32) -> LevelResult:
    """``requests`` Synthesize streams, at most ``concurrency`` at once (``run_streams``)."""
    from tts_api.v1 import token_service_pb2_grpc

    async def stream(channel, index: int, on_audio) -> StreamRecord:
        return await run_stream(token_service_pb2_grpc.TokenServiceStub(channel), index, spec, on_audio=on_audio)

    return await run_streams(target, stream, concurrency, requests, level_time_s=level_time_s, ramp_s=ramp_s,
                             first_index=first_index, streams_per_channel=streams_per_channel)


# one stream: (channel, stream index, on_audio(record) at its first audio) -> its record
StreamFn = Callable[[grpc.aio.Channel, int, Callable[[StreamRecord], None]], Awaitable[StreamRecord]]


async def run_streams(target: str, stream: StreamFn, concurrency: int, requests: int, *, level_time_s: float = 120.0,
                      ramp_s: float = 0.0, first_index: int = 0, streams_per_channel: int = 32) -> LevelResult:
    """One load level of any streaming RPC: ``requests`` streams (indices ``first_index``, ...), at most
    ``concurrency`` at once — each worker runs ``stream(channel, index, on_audio)`` back to back.

    Workers start spread evenly over ``ramp_s`` seconds; no stream starts after ``level_time_s``.
    Channels: one per ``streams_per_channel`` workers. ``held_max`` counts the streams that had
    called ``on_audio`` and not yet ended."""
    n_channels = max(1, math.ceil(concurrency / streams_per_channel))
    channels = [grpc.aio.insecure_channel(target, options=_channel_options()) for _ in range(n_channels)]
    records: list[StreamRecord] = []
    next_index = iter(range(first_index, first_index + requests))
    start = time.perf_counter()
    held = 0
    held_max = 0

    def audio_started(_rec):
        nonlocal held, held_max
        held += 1
        held_max = max(held_max, held)

    async def worker(w: int) -> None:
        nonlocal held
        if ramp_s and concurrency > 1:
            await asyncio.sleep(ramp_s * w / concurrency)
        for index in next_index:
            if time.perf_counter() - start > level_time_s:
                return
            rec = await stream(channels[w % len(channels)], index, audio_started)
            if rec.first_audio is not None:
                held -= 1
            records.append(rec)

    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        for ch in channels:
            await ch.close()
    return LevelResult(concurrency, sorted(records, key=lambda r: r.index), time.perf_counter() - start, held_max)


def summarize(level: LevelResult, tolerance: float = 0.0) -> dict[str, Any]:
    """The figures of one level (see the module docstring)."""
    recs = level.records
    ok = [r for r in recs if r.status == "OK"]
    ttfa = [r.ttfa_s * 1000 for r in recs if r.ttfa_s is not None]
    ttfa_text = [r.ttfa_from_first_text_s * 1000 for r in recs if r.ttfa_from_first_text_s is not None]
    under = [r.underruns(tolerance) for r in ok]
    audio = sum(r.audio_s for r in recs)
    errors = Counter(r.status for r in recs if r.status != "OK")
    rtf = [r.summary_rtf for r in ok if r.summary_rtf]
    return {
        "concurrency": level.concurrency,
        "requests": len(recs),
        "ok": len(ok),
        "streams_held": level.held_max,
        "ttfa_p50_ms": pct(ttfa, 50),
        "ttfa_p90_ms": pct(ttfa, 90),
        "ttfa_p99_ms": pct(ttfa, 99),
        "ttfa_from_first_text_p50_ms": pct(ttfa_text, 50),
        "ttfa_from_first_text_p99_ms": pct(ttfa_text, 99),
        "underruns": sum(u for u, _ in under),
        "underrun_streams": sum(1 for u, _ in under if u),
        "stalled_s": round(sum(s for _, s in under), 4),
        "audio_s": round(audio, 3),
        "wall_s": round(level.wall_s, 3),
        "audio_s_per_s": audio / level.wall_s if level.wall_s else 0.0,
        "rtf_p50": statistics.median(rtf) if rtf else float("nan"),
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        "error_examples": {code: next(r.details for r in recs if r.status == code)[:300] for code in errors},
    }


# ------------------------------------------------------------------------------ server processes
def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` (VmRSS from /proc/<pid>/status) in MB; nan if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def gpu_mem_by_pid() -> dict[int, float]:
    """GPU memory in MB per process (``nvidia-smi --query-compute-apps``); {} without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    mem: dict[int, float] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            try:
                mem[int(parts[0])] = float(parts[1])
            except ValueError:
                pass
    return mem


class GpuMemSampler:
    """Samples ``gpu_mem_by_pid`` on a thread; ``peak`` = max MB per pid; ``mark()`` starts a new window."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.peak: dict[int, float] = {}
        self.window: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-mem", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)

    def mark(self) -> dict[int, float]:
        """Return the peaks since the last mark and start a new window."""
        self.sample()
        out, self.window = self.window, {}
        return out

    def sample(self) -> None:
        for pid, mb in gpu_mem_by_pid().items():
            self.peak[pid] = max(self.peak.get(pid, 0.0), mb)
            self.window[pid] = max(self.window.get(pid, 0.0), mb)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ServiceProcesses:
    """Both services as subprocesses on loopback (free ports). Use as a context manager.

    ``token_flags`` / ``vocoder_flags`` are extra command-line flags (e.g. ``["--kv-slots", "8"]``).
    ``colocate``: one process serves both (``python -m token_service serve-colocated``; the vocoder's
    flags go in its ``--vocoder-flags``, its port is chosen in-process); ``pids`` is then
    ``{"colocated": pid}`` and the log ``colocated.log``."""

    model_dir: Path
    device: str = "cpu"
    engine: str = "pytorch"
    max_streams: int = 16
    token_flags: list[str] = dataclasses.field(default_factory=list)
    vocoder_flags: list[str] = dataclasses.field(default_factory=list)
    log_dir: Path | None = None
    ready_timeout_s: float = 600.0
    drain_seconds: float = 5.0
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    vocoder_env: dict[str, str] = dataclasses.field(default_factory=dict)  # the vocoder's only (after ``env``)
    colocate: bool = False

    def __post_init__(self):
        if self.colocate and self.vocoder_env:
            raise ValueError(f"vocoder_env {sorted(self.vocoder_env)} cannot apply to the vocoder alone when both "
                             "services share one process (colocate)")
        self.vocoder_port, self.token_port = free_port(), free_port()
        self.vocoder_target = f"127.0.0.1:{self.vocoder_port}"
        self.token_target = f"127.0.0.1:{self.token_port}"
        self.vocoder: subprocess.Popen | None = None
        self.token: subprocess.Popen | None = None
        self.colocated: subprocess.Popen | None = None
        self._logs: list = []

    def _start(self, module: str, flags: list[str], name: str, env: dict[str, str] | None = None,
               command: str = "serve") -> subprocess.Popen:
        env = {**os.environ, "TTS_LOG_FORMAT": "json", **self.env, **(env or {})}
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "wb")
            self._logs.append(out)
        else:
            out = subprocess.DEVNULL
        cmd = [sys.executable, "-m", module, command, "--model-dir", str(self.model_dir), "--device", self.device,
               "--engine", self.engine, "--max-streams", str(self.max_streams),
               "--drain-seconds", str(self.drain_seconds), *flags]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def start_vocoder(self) -> None:
        self.vocoder = self._start("vocoder_service", ["--listen", self.vocoder_target, *self.vocoder_flags],
                                   "vocoder-service", self.vocoder_env)

    def start(self) -> ServiceProcesses:
        if self.colocate:
            vocoder = ["--engine", self.engine, "--max-streams", str(self.max_streams), *self.vocoder_flags]
            # "--vocoder-flags=...": one argv item, so argparse never takes a lone "--flag" value for an option
            self.colocated = self._start("token_service", ["--listen", self.token_target, *self.token_flags,
                                                           f"--vocoder-flags={shlex.join(vocoder)}"],
                                         "colocated", command="serve-colocated")
            wait_healthy(self.token_target, self.colocated, self.ready_timeout_s, "co-located services",
                         self.log_dir / "colocated.log" if self.log_dir else None)
            return self
        self.start_vocoder()
        self.token = self._start("token_service", ["--listen", self.token_target, "--vocoder-target", self.vocoder_target,
                                                   *self.token_flags], "token-service")
        logs = self.log_dir or None
        wait_healthy(self.vocoder_target, self.vocoder, self.ready_timeout_s, "vocoder service",
                     logs / "vocoder-service.log" if logs else None)
        wait_healthy(self.token_target, self.token, self.ready_timeout_s, "token service",
                     logs / "token-service.log" if logs else None)
        return self

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in (("token_service", self.token), ("vocoder_service", self.vocoder),
                                            ("colocated", self.colocated))
                if p is not None and p.poll() is None}

    def stop(self, timeout_s: float = 30.0) -> dict[str, int | None]:
        """SIGTERM both (token service first), wait, SIGKILL what is left; returns the exit codes."""
        procs = [("token_service", self.token), ("vocoder_service", self.vocoder), ("colocated", self.colocated)]
        for _, p in procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, p in procs:
            if p is None:
                continue
            try:
                codes[name] = p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait(10)
        for f in self._logs:
            f.close()
        self._logs = []
        return codes

    def __enter__(self) -> ServiceProcesses:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------- runs / CLI
def run_sweep(target: str, levels: Sequence[int], requests: int | None, spec: StreamSpec, *, pids: dict[str, int] | None = None,
              level_time_s: float = 120.0, ramp_s: float = 0.0, warmup: int = 0, tolerance: float = 0.0,
              rounds: int = 1, gpu: GpuMemSampler | None = None, settle_s: float = 0.0, log=print) -> dict[str, Any]:
    """Warm up, then each level in turn (``requests`` streams, or ``rounds`` × the level); RSS around each level.

    Each level records ``t_start`` / ``t_end`` (unix seconds); ``settle_s`` is an idle pause after the
    warm-up and after each level (so services logging ``TTS_STATS_LOG_S`` lines can be cut per level:
    bench/engine_stats.py)."""
    pids = pids or {}
    out: dict[str, Any] = {"target": target, "spec": dataclasses.asdict(spec), "levels": {}}
    out["rss_mb_start"] = {k: rss_mb(p) for k, p in pids.items()}
    before: dict[str, float] = {}

    def level_starts(n: int) -> None:
        before.clear()
        before.update({k: rss_mb(p) for k, p in pids.items()})
        if gpu is not None:
            gpu.mark()

    def level_ended(n: int, fig: dict[str, Any]) -> None:
        fig["rss_mb_before"] = dict(before)
        fig["rss_mb_after"] = {k: rss_mb(p) for k, p in pids.items()}
        if gpu is not None:
            fig["gpu_mem_MB_peak_by_pid"] = gpu.mark()
        log(f"  concurrency {n}: {fig['ok']}/{fig['requests']} ok, TTFA p50 {fig['ttfa_p50_ms']:.0f} ms "
            f"p99 {fig['ttfa_p99_ms']:.0f} ms, underruns {fig['underruns']}, {fig['audio_s_per_s']:.2f} audio s/s, "
            f"errors {fig['errors_by_code']}")

    out["levels"] = sweep_levels(lambda n, count, **kw: run_level(target, n, count, spec, level_time_s=level_time_s, **kw),
                                 levels, requests=requests, rounds=rounds, warmup=warmup, ramp_s=ramp_s,
                                 settle_s=settle_s, figures=lambda level: summarize(level, tolerance),
                                 level_starts=level_starts, level_ended=level_ended)
    return out


def sweep_levels(run_at: Callable[..., Awaitable[LevelResult]], levels: Sequence[int], *, requests: int | None = None,
                 rounds: int = 1, warmup: int = 0, ramp_s: float = 0.0, first_index: int = 0, settle_s: float = 0.0,
                 figures: Callable[[LevelResult], dict[str, Any]] = summarize,
                 level_starts: Callable[[int], None] | None = None,
                 level_ended: Callable[[int, dict[str, Any]], None] | None = None) -> dict[Any, dict[str, Any]]:
    """The loop of a sweep, for any stream kind: ``run_at(concurrency, count, first_index=, ramp_s=)``
    runs one level (e.g. ``run_level`` with its target and spec bound).

    First ``warmup`` streams (not counted; stream indices from ``10**6 + first_index``), then each
    level ``n``: ``requests`` streams (or ``rounds`` × n; indices continue from ``first_index``),
    summarized by ``figures`` plus ``t_start`` / ``t_end`` (unix seconds). ``settle_s``: an idle pause
    after the warm-up and after each level. ``level_starts(n)`` / ``level_ended(n, figures)`` run
    around each level. Returns ``{level: figures}``; a level given twice (e.g. 4,4,4 to watch memory)
    gets keys ``4``, ``"4#1"``, ``"4#2"``."""
    if warmup:
        asyncio.run(run_at(min(warmup, max(levels)), warmup, first_index=10**6 + first_index, ramp_s=0.0))
        time.sleep(settle_s)
    out: dict[Any, dict[str, Any]] = {}
    index = first_index
    for n in levels:
        if level_starts is not None:
            level_starts(n)
        count = requests if requests else rounds * n
        t_start = time.time()
        fig = figures(asyncio.run(run_at(n, count, first_index=index, ramp_s=ramp_s)))
        fig.update(t_start=round(t_start, 3), t_end=round(time.time(), 3))
        index += count
        key = n if n not in out else f"{n}#{sum(1 for k in out if str(k).split('#')[0] == str(n))}"
        out[key] = fig
        if level_ended is not None:
            level_ended(n, fig)
        time.sleep(settle_s)
    return out


def table(run: dict[str, Any]) -> str:
    lines = ["| concurrency | ok / requests | held | TTFA p50 / p99 ms | from first text p50 ms | underruns (streams) | "
             "audio s/s | errors | RSS MB before → after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, f in run["levels"].items():
        rss = ", ".join(f"{k} {f['rss_mb_before'][k]:.0f} → {f['rss_mb_after'].get(k, float('nan')):.0f}"
                        for k in f["rss_mb_before"]) or "–"
        errs = ", ".join(f"{k} {v}" for k, v in f["errors_by_code"].items()) or "0"
        lines.append(f"| {n} | {f['ok']} / {f['requests']} | {f['streams_held']} | {f['ttfa_p50_ms']:.0f} / "
                     f"{f['ttfa_p99_ms']:.0f} | {f['ttfa_from_first_text_p50_ms']:.0f} | {f['underruns']} "
                     f"({f['underrun_streams']}) | {f['audio_s_per_s']:.2f} | {errs} | {rss} |")
    return "\n".join(lines)


def _check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"--target {target} is not a loopback address; pass --allow-remote to load a remote server")


def load_arg_parser(prog: str, description: str, *, target: str, spawn: str, deadline_s: float) -> argparse.ArgumentParser:
    """The options every load generator here shares (where to send load, the levels, pacing of the
    sweep, output); ``target`` / ``spawn`` name what ``--target`` / ``--spawn`` reach."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help=f"host:port of a running {target}")
    where.add_argument("--spawn", metavar="MODEL_DIR", help=f"start {spawn} on loopback from this model folder")
    ap.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --target")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    ap.add_argument("--requests", type=int, default=0, help="streams per level (0: --rounds x the level)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="streams before the first level (not counted)")
    ap.add_argument("--sentences", type=int, default=0, help="sentences per stream (0: alternate 1 and 2)")
    ap.add_argument("--deadline", type=float, default=deadline_s, help="gRPC deadline of each stream, seconds")
    ap.add_argument("--level-time", type=float, default=300.0, help="no stream starts after this many seconds of a level")
    ap.add_argument("--ramp", type=float, default=0.0, help="spread the workers' first starts over this many seconds")
    ap.add_argument("--tolerance-ms", type=float, default=0.0, help="lateness not counted as an underrun")
    ap.add_argument("--device", default="cpu", help="with --spawn: the --device of what it starts")
    ap.add_argument("--log-dir", default="", help="with --spawn: write the service logs here")
    ap.add_argument("--json-out", default="", help="also write the JSON here")
    return ap


def print_results(table_md: str, results: Any, json_out: str = "") -> None:
    """A CLI's end: the markdown table, then the results as one JSON object (also to ``json_out``)."""
    print(table_md)
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if json_out:
        Path(json_out).write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = load_arg_parser("python -m bench.service_load", __doc__.split("\n\n")[0], target="token service",
                         spawn="both services", deadline_s=60.0)
    ap.add_argument("--server-pids", default="", help="with --target: comma-separated pids whose RSS to report")
    ap.add_argument("--words-per-piece", type=int, default=3)
    ap.add_argument("--piece-gap-ms", type=float, default=30.0)
    ap.add_argument("--max-new-tokens", type=int, default=0, help="cap on speech tokens per sentence (0: server's)")
    ap.add_argument("--max-streams", type=int, default=0, help="with --spawn: --max-streams (0: the largest level)")
    ap.add_argument("--token-flags", default="", help="with --spawn: extra token service flags (space-separated)")
    ap.add_argument("--colocate", action="store_true", help="with --spawn: both services in one process "
                                                             "(python -m token_service serve-colocated)")
    args = ap.parse_args(argv)

    levels = [int(x) for x in args.concurrency.split(",") if x]
    spec = StreamSpec(sentences=args.sentences, words_per_piece=args.words_per_piece, piece_gap_s=args.piece_gap_ms / 1000,
                      max_new_tokens=args.max_new_tokens or None, deadline_s=args.deadline)
    kw = dict(level_time_s=args.level_time, ramp_s=args.ramp, warmup=args.warmup, tolerance=args.tolerance_ms / 1000,
              rounds=args.rounds)
    procs = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop spawned services
    if args.spawn:
        procs = ServiceProcesses(Path(args.spawn), device=args.device, max_streams=args.max_streams or max(levels),
                                 token_flags=args.token_flags.split(), log_dir=Path(args.log_dir) if args.log_dir else None,
                                 colocate=args.colocate)
        procs.start()
        target, pids = procs.token_target, procs.pids
    else:
        if not args.allow_remote:
            _check_loopback(args.target)
        target = args.target
        pids = {f"pid{p}": int(p) for p in args.server_pids.split(",") if p.strip()}
    try:
        print(f"load on {target}: levels {levels}, {args.requests or f'{args.rounds} x level'} streams each", flush=True)
        run = run_sweep(target, levels, args.requests or None, spec, pids=pids, **kw)
    finally:
        if procs is not None:
            run_codes = procs.stop()
            print(f"services stopped: exit codes {run_codes}")
    print_results(table(run), run, args.json_out)
    return 0


def split_log(path: Path, by_logger: dict[str, Path]) -> None:
    """Write the JSON lines of ``path`` whose ``logger`` starts with a key of ``by_logger`` to that key's file
    (a co-located process logs both services into one file; bench/engine_stats.py reads one per service)."""
    outs = {prefix: open(dest, "w") for prefix, dest in by_logger.items()}
    try:
        with path.open(errors="replace") as lines:
            for line in lines:
                try:
                    logger = json.loads(line).get("logger", "")
                except (ValueError, AttributeError):
                    continue
                for prefix, out in outs.items():
                    if logger.startswith(prefix):
                        out.write(line)
    finally:
        for out in outs.values():
            out.close()


# ---------------------------------------------------------------------------------- GPU bench entry
def services_section(model_dir: Path, sweep: list[int], results: dict, *, device: str | None = None,
                     max_new_tokens: int | None = None, c1_requests: int = 20, level_time_s: float | None = None,
                     log_dir: Path | None = None, ready_timeout_s: float = 900.0,
                     vocoder_flags: list[str] | None = None, token_flags: list[str] | None = None,
                     stats_log_s: float = 0.0, env: dict[str, str] | None = None, key: str = "services",
                     vocoder_env: dict[str, str] | None = None, colocate: bool = False) -> None:
    """Both services as processes on ``device`` (default: cuda if available, else cpu), then measure.

    ``colocate``: both services in ONE process (``python -m token_service serve-colocated``, one CUDA
    context; docs/ARCHITECTURE.md "Co-located mode"); ``gpu_mem_MB*`` / ``rss_MB`` then have one entry,
    ``colocated``, and its ``total`` is that process's memory (both services together).

    ``env``: extra environment for both service processes (e.g. an MPS client's, bench/mps.py);
    ``vocoder_env``: for the vocoder only (e.g. ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``).
    Writes ``results[key]`` (``key`` default ``"services"``): ``ttfa_c1_p50_ms`` / ``ttfa_c1_p90_ms`` (concurrency 1,
    ``c1_requests`` streams, first sentence as LLM pieces; TTFA as defined in the module docstring),
    ``ttfa_c1_from_first_text_p50_ms``, ``rtf`` (median of the servers' per-stream real-time factor at
    concurrency 1), ``gpu_mem_MB`` (peak per service process from nvidia-smi, overall and at
    concurrency 1; None without nvidia-smi), ``rss_MB``, ``config``, and ``sweep`` ({level: ttfa_p50_ms,
    ttfa_p99_ms, underruns, underrun_streams, audio_s_per_s, errors, errors_by_code, streams_held, ...}).

    Each stream speaks one or two sentences capped at ``max_new_tokens`` speech tokens each (random
    weights never say stop): 72 (+3 silence) = 3 s a sentence, so 3–6 s a stream. Each level runs two
    rounds of its concurrency (starts spread over 1 s) and starts nothing after ``level_time_s``.
    On CPU, levels above ``CPU_MAX_LEVEL`` are skipped (``skipped_levels_on_cpu``).

    ``stats_log_s`` > 0: both services log their engine statistics that often (``TTS_STATS_LOG_S``),
    levels are separated by an idle pause a bit longer than that, and each level (and ``c1``) gets
    ``engine_stats: {"token_service": ..., "vocoder_service": ...}`` read back from the logs
    (bench/engine_stats.py: steps and rows per second, worker busy fraction, queue waits, ...).
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device.startswith("cuda")
    if max_new_tokens is None:
        max_new_tokens = 72 if on_gpu else 22
    if level_time_s is None:
        level_time_s = 45.0 if on_gpu else 30.0
    skipped = [] if on_gpu else [n for n in sweep if n > CPU_MAX_LEVEL]
    sweep = [n for n in sweep if n not in skipped] or [1]
    top = max(sweep)
    # KV slots are static memory: size them to what a stream needs (voice prefix + text + speech tokens).
    max_seq_len = 768  # 376-position voice prefix + text (<= 320 tokens) + max_new_tokens
    extra_token_flags = list(token_flags or [])
    token_flags = ["--max-new-tokens", str(max_new_tokens), "--max-seq-len", str(max_seq_len), "--kv-slots", str(top),
                   *extra_token_flags]
    spec = StreamSpec(max_new_tokens=max_new_tokens, deadline_s=120.0 if on_gpu else 90.0)
    out: dict[str, Any] = {"config": {"device": device, "max_streams": top, "kv_slots": top, "max_seq_len": max_seq_len,
                                      "max_new_tokens_per_sentence": max_new_tokens, "words_per_piece": spec.words_per_piece,
                                      "piece_gap_ms": spec.piece_gap_s * 1000}}
    if skipped:
        out["skipped_levels_on_cpu"] = skipped
    results[key] = out
    out["config"]["env"] = dict(env or {})
    out["config"]["vocoder_env"] = dict(vocoder_env or {})
    out["config"]["vocoder_flags"] = list(vocoder_flags or [])
    out["config"]["token_flags"] = extra_token_flags
    out["config"]["colocate"] = colocate
    tmp_logs = None
    if stats_log_s > 0 and log_dir is None:  # the stats are read back from the logs
        import tempfile

        tmp_logs = tempfile.TemporaryDirectory(prefix="services-logs-")
        log_dir = Path(tmp_logs.name)
    out["config"]["stats_log_s"] = stats_log_s
    settle_s = stats_log_s + SETTLE_MARGIN_S if stats_log_s > 0 else 0.0
    procs = ServiceProcesses(Path(model_dir), device=device, max_streams=top, token_flags=token_flags,
                             vocoder_flags=list(vocoder_flags or []), log_dir=log_dir, ready_timeout_s=ready_timeout_s,
                             env={**(env or {}), **({"TTS_STATS_LOG_S": str(stats_log_s)} if stats_log_s > 0 else {})},
                             vocoder_env=dict(vocoder_env or {}), colocate=colocate)
    t0 = time.perf_counter()
    with GpuMemSampler() as gpu, procs:
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        pids = procs.pids
        names = {pid: name for name, pid in pids.items()}

        def by_service(mem: dict[int, float]) -> dict[str, float | None]:
            if not mem:
                return {**({"colocated": None} if colocate else {"token_service": None, "vocoder_service": None}),
                        "total": None}
            got = {names[p]: mb for p, mb in mem.items() if p in names}
            if not got:  # pids from another pid namespace (containers): report what nvidia-smi saw
                return {"unmatched_pids": {str(p): mb for p, mb in mem.items()}, "total": sum(mem.values())}
            return {**got, "total": sum(got.values())}

        out["rss_MB"] = {"idle": {k: rss_mb(p) for k, p in pids.items()}}
        out["gpu_mem_MB_idle"] = by_service(gpu.mark())
        # warm-up (not counted), then concurrency 1
        asyncio.run(run_level(procs.token_target, 1, 2, spec, first_index=10**6))
        time.sleep(settle_s)
        gpu.mark()
        t_c1 = time.time()
        c1 = summarize(asyncio.run(run_level(procs.token_target, 1, c1_requests, spec, level_time_s=level_time_s)))
        c1.update(t_start=round(t_c1, 3), t_end=round(time.time(), 3))
        time.sleep(settle_s)
        out["gpu_mem_MB_c1"] = by_service(gpu.mark())
        out["ttfa_c1_p50_ms"] = c1["ttfa_p50_ms"]
        out["ttfa_c1_p90_ms"] = c1["ttfa_p90_ms"]
        out["ttfa_c1_from_first_text_p50_ms"] = c1["ttfa_from_first_text_p50_ms"]
        out["rtf"] = c1["rtf_p50"]
        out["c1"] = c1
        sw = run_sweep(procs.token_target, sweep, None, spec, pids=pids, level_time_s=level_time_s, ramp_s=1.0,
                       rounds=2, gpu=gpu, settle_s=settle_s, log=lambda m: print(m, flush=True))
        out["sweep"] = {}
        for n, fig in sw["levels"].items():
            fig["gpu_mem_MB_peak"] = by_service(fig.pop("gpu_mem_MB_peak_by_pid", {}))
            out["sweep"][n] = fig
        out["rss_MB"]["end"] = {k: rss_mb(p) for k, p in pids.items()}
        gpu.sample()
        out["gpu_mem_MB"] = by_service(dict(gpu.peak))
    out["exit_codes"] = procs.stop()
    if stats_log_s > 0:  # after stop: each service's final stats line is in its log
        from bench.engine_stats import attach

        logs = {"token_service": log_dir / "token-service.log", "vocoder_service": log_dir / "vocoder-service.log"}
        if colocate:  # one log for both: each service's stats lines by their logger
            split_log(log_dir / "colocated.log", {"token_service.": logs["token_service"],
                                                  "vocoder_service.": logs["vocoder_service"]})
        attach({"c1": out["c1"], **out["sweep"]}, logs, slack_s=stats_log_s + SETTLE_MARGIN_S / 2)
        if tmp_logs is not None:
            tmp_logs.cleanup()


if __name__ == "__main__":
    sys.exit(main())
