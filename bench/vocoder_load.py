"""Load generator for the vocoder service alone: N concurrent ``Vocode`` streams of synthetic speech tokens.

    python -m bench.vocoder_load --target 127.0.0.1:50052 --concurrency 1,8,32 --modes burst,realtime
    python -m bench.vocoder_load --spawn .cache/test-demo/tiny-... --device cpu --concurrency 1,4 --modes fast

Issue 6: the two services together deliver ~78 audio s/s at 128 streams while S3Gen's batched step
alone does ~270. This drives the vocoder service without the token service (no T3 on the GPU, no
relay), so a run separates "the vocoder service is slow" from "the two processes share the GPU".

What a stream does (``VocodeSpec``): a config (default voice, seed = stream index), then the speech
tokens of one or two "sentences" (``sentences``; 0 = alternate 1 and 2, like bench/service_load.py)
of ``sentence_tokens`` random ids each, every sentence followed by upstream's three silence tokens
(4299) in one message, as the token service sends them; then end-of-input. Tokens go out in messages
of ``tokens_per_message`` (the token service sends what T3 made per step: 1 token a message unless
``TTS_VOCODER_MIN_TOKENS`` merges them), paced at ``rate_tps`` tokens per second on an absolute
schedule (token k is due at ``k / rate_tps`` after the first; 0 = as fast as possible). Modes:
``realtime`` = 25 tokens/s (one second of audio per second), ``burst`` = 100 tokens/s (about what T3
gives each stream on an H100: 10.6k tokens/s over 128 streams, 4.0k over 8), ``fast`` = no pacing
(capacity); a number is a rate.

Per stream (``VocodeRecord``, a ``service_load.StreamRecord``; times are seconds after the stream opened):

* ``ttfa_s`` — first non-empty audio minus the moment the first token was sent;
* chunk latency — each audio message's arrival minus the send time of the last token it could depend
  on (``tokens_received``; the final message: minus the end-of-input) — the vocoder's own delay,
  when the input is paced (``fast`` sends every token at once, so there a chunk's latency also holds
  the stream's own earlier chunks); ``first_chunk_latency`` is that of the first audio;
* underruns — ``service_load.count_underruns`` on (arrival, duration); ``ideal_underruns`` the same rule
  on an instant vocoder's arrivals (each message at its latency's start), i.e. the underruns the input
  pacing causes by itself (at 25 tokens/s a player that starts at the first chunk runs dry by
  construction); ``excess_underruns`` = underruns − ideal.

Per level: ``service_load.summarize``'s figures (same keys as the services sweep: ``ttfa_p50_ms``,
``underruns``, ``audio_s_per_s``, ...) plus ``chunk_latency_p50/p99_ms``,
``first_chunk_latency_p50/p99_ms``, ``ideal_underruns``, ``excess_underruns``, ``tokens_per_s_sent``,
and ``t_start`` / ``t_end`` (unix seconds; bench/engine_stats.py cuts the service's stats lines with
them).

``vocoder_only_section(model_dir, levels, results)`` is the GPU bench's entry: it starts only the
vocoder service (``TTS_STATS_LOG_S`` set), runs each mode's sweep and writes
``results["vocoder_only"]`` with each level's engine statistics from the service's log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.engine_stats import SETTLE_MARGIN_S, attach, read_stats
from bench.service_load import (CPU_MAX_LEVEL, SAMPLE_RATE, LevelResult, ServiceProcesses, StreamRecord,
                                _check_loopback, count_underruns, load_arg_parser, pct, print_results, read_responses,
                                run_streams, summarize, sweep_levels)
from tts_client.health import wait_healthy

SILENCE = [4299, 4299, 4299]  # upstream's S3GEN_SIL, three after each utterance
SPEECH_VOCAB = 6561
MODES = {"realtime": 25.0, "burst": 100.0, "fast": 0.0}


@dataclasses.dataclass
class VocodeSpec:
    """How each stream of a run behaves (see the module docstring)."""

    rate_tps: float = 25.0  # tokens per second per stream; 0 = as fast as possible
    sentences: int = 0  # per stream; 0 = alternate 1 and 2
    sentence_tokens: int = 72  # speech tokens per sentence (+3 silence): 3 s of audio
    tokens_per_message: int = 1
    deadline_s: float = 120.0
    voice: str = ""

    def messages(self, index: int) -> list[tuple[list[int], bool]]:
        """Stream ``index``'s token messages in order, each with whether it is paced (a sentence's
        silence is one unpaced message: it follows the sentence's last token at once)."""
        rng = np.random.default_rng(index)
        n = self.sentences or (1 + index % 2)
        out: list[tuple[list[int], bool]] = []
        for _ in range(n):
            ids = rng.integers(0, SPEECH_VOCAB, self.sentence_tokens).tolist()
            out += [(ids[i:i + self.tokens_per_message], True) for i in range(0, len(ids), self.tokens_per_message)]
            out.append((list(SILENCE), False))
        return out


def mode_rate(mode: str) -> float:
    """Tokens/s of a mode name (``realtime``, ``burst``, ``fast``) or a number."""
    if mode in MODES:
        return MODES[mode]
    try:
        rate = float(mode)
    except ValueError:
        raise ValueError(f"unknown mode {mode!r}: use {', '.join(MODES)} or a rate in tokens/s") from None
    if rate < 0:
        raise ValueError(f"a rate must be >= 0 tokens/s, got {rate}")
    return rate


@dataclasses.dataclass
class VocodeRecord(StreamRecord):
    """A ``StreamRecord`` (so ``service_load.summarize`` applies) plus what the vocoder's delay needs.

    ``first_text`` and ``sentence_ready`` are both the first token's send time, so ``ttfa_s`` counts
    from the first token. ``sent[k]`` is the send time of token k; ``messages`` holds each audio
    message as (arrival, audio seconds, tokens_received, final)."""

    sent: list[float] = dataclasses.field(default_factory=list)
    end_sent: float | None = None
    messages: list[tuple[float, float, int, bool]] = dataclasses.field(default_factory=list)

    def depends_on(self, tokens_received: int, final: bool) -> float | None:
        """Send time of what an audio message waited for: its last token, or the end-of-input."""
        if final and self.end_sent is not None:
            return self.end_sent
        if 0 < tokens_received <= len(self.sent):
            return self.sent[tokens_received - 1]
        return None

    def chunk_latencies(self) -> list[float]:
        out = []
        for arrival, dur, k, final in self.messages:
            dep = self.depends_on(k, final)
            if dur > 0 and dep is not None:
                out.append(arrival - dep)
        return out

    def ideal_underruns(self, tolerance: float = 0.0) -> int:
        ideal = []
        for arrival, dur, k, final in self.messages:
            dep = self.depends_on(k, final)
            if dur > 0:
                ideal.append((arrival if dep is None else dep, dur))
        return count_underruns(ideal, tolerance)[0]


async def run_vocode_stream(stub, index: int, spec: VocodeSpec, on_audio=None) -> VocodeRecord:
    """One ``Vocode`` stream (see the module docstring); never raises for gRPC errors."""
    from tts_api.v1 import common_pb2, vocoder_service_pb2 as voc

    rec = VocodeRecord(index=index, opened=time.perf_counter())
    t0 = rec.opened
    msgs = spec.messages(index)

    async def requests() -> AsyncIterator:
        yield voc.VocodeRequest(config=voc.VocodeConfig(voice=spec.voice, seed=index))
        start = None
        k = 0  # tokens sent so far
        for ids, paced in msgs:
            if start is None:
                start = time.perf_counter()
            elif spec.rate_tps > 0 and paced:
                due = start + (k + len(ids) - 1) / spec.rate_tps
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            now = time.perf_counter() - t0
            if rec.first_text is None:
                rec.first_text = rec.sentence_ready = now
            rec.sent += [now] * len(ids)
            k += len(ids)
            yield voc.VocodeRequest(tokens=voc.TokenChunk(token_ids=ids))
        rec.end_sent = time.perf_counter() - t0
        yield voc.VocodeRequest(end=common_pb2.EndOfInput())

    def on_response(resp, now: float) -> None:
        n = len(resp.pcm_f32) // 4
        dur = n / (resp.sample_rate_hz or SAMPLE_RATE)
        if n and rec.first_audio is None:
            rec.first_audio = now
            if on_audio is not None:
                on_audio(rec)
        if n:
            rec.chunks.append((now, dur))
        rec.messages.append((now, dur, resp.tokens_received, resp.final))

    await read_responses(stub.Vocode(requests(), timeout=spec.deadline_s), rec, on_response)
    return rec


async def run_vocode_level(target: str, concurrency: int, requests: int, spec: VocodeSpec, *,
                           level_time_s: float = 120.0, ramp_s: float = 0.0, first_index: int = 0,
                           streams_per_channel: int = 32) -> LevelResult:
    """``requests`` Vocode streams, at most ``concurrency`` at once (``service_load.run_streams``: workers
    run streams back to back, start spread over ``ramp_s``; no stream starts after ``level_time_s``)."""
    from tts_api.v1 import vocoder_service_pb2_grpc

    async def stream(channel, index: int, on_audio) -> VocodeRecord:
        return await run_vocode_stream(vocoder_service_pb2_grpc.VocoderServiceStub(channel), index, spec,
                                       on_audio=on_audio)

    return await run_streams(target, stream, concurrency, requests, level_time_s=level_time_s, ramp_s=ramp_s,
                             first_index=first_index, streams_per_channel=streams_per_channel)


def summarize_vocode(level: LevelResult, tolerance: float = 0.0) -> dict[str, Any]:
    """``service_load.summarize`` plus the vocoder-side figures (module docstring)."""
    fig = summarize(level, tolerance)
    ok = [r for r in level.records if r.status == "OK"]
    per_stream = [[x * 1000 for x in r.chunk_latencies()] for r in level.records]
    lat = [x for ms in per_stream for x in ms]
    first = [ms[0] for ms in per_stream if ms]
    ideal = sum(r.ideal_underruns(tolerance) for r in ok)
    sent = sum(len(r.sent) for r in level.records)
    fig.update(chunk_latency_p50_ms=pct(lat, 50), chunk_latency_p99_ms=pct(lat, 99),
               first_chunk_latency_p50_ms=pct(first, 50), first_chunk_latency_p99_ms=pct(first, 99),
               ideal_underruns=ideal, excess_underruns=fig["underruns"] - ideal,
               tokens_per_s_sent=sent / level.wall_s if level.wall_s else 0.0)
    fig.pop("rtf_p50", None)  # the vocoder sends no summary
    fig.pop("ttfa_from_first_text_p50_ms", None)  # = ttfa here
    fig.pop("ttfa_from_first_text_p99_ms", None)
    return fig


def vocoder_sweep(target: str, levels: Sequence[int], spec: VocodeSpec, *, requests: int | None = None, rounds: int = 2,
                  level_time_s: float = 120.0, ramp_s: float = 0.0, warmup: int = 0, tolerance: float = 0.0,
                  first_index: int = 0, settle_s: float = 0.0, log=print) -> dict[str, Any]:
    """Warm up (not counted), then each level: ``requests`` streams (or ``rounds`` × the level).

    Returns ``{"target", "spec", "levels": {level: figures}}``; each level has ``t_start`` / ``t_end``.
    ``settle_s``: an idle pause after the warm-up and after each level, so a service logging its stats
    every ``s < settle_s`` seconds has logged a level's last work before the next level starts (the
    stats of each level are then cut exactly; bench/engine_stats.py)."""
    out: dict[str, Any] = {"target": target, "spec": dataclasses.asdict(spec), "levels": {}}

    def level_ended(n: int, fig: dict[str, Any]) -> None:
        log(f"  vocoder-only {spec.rate_tps:g} tok/s, {n} streams: {fig['ok']}/{fig['requests']} ok, TTFA p50 "
            f"{fig['ttfa_p50_ms']:.0f} ms p99 {fig['ttfa_p99_ms']:.0f} ms, chunk latency p50 "
            f"{fig['chunk_latency_p50_ms']:.0f} p99 {fig['chunk_latency_p99_ms']:.0f} ms, underruns {fig['underruns']} "
            f"(ideal {fig['ideal_underruns']}), {fig['audio_s_per_s']:.2f} audio s/s, errors {fig['errors_by_code']}")

    out["levels"] = sweep_levels(
        lambda n, count, **kw: run_vocode_level(target, n, count, spec, level_time_s=level_time_s, **kw), levels,
        requests=requests, rounds=rounds, warmup=warmup, ramp_s=ramp_s, first_index=first_index, settle_s=settle_s,
        figures=lambda level: summarize_vocode(level, tolerance), level_ended=level_ended)
    return out


def table(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown table of ``{mode: vocoder_sweep(...)}`` (engine columns when stats were attached)."""
    lines = ["| mode | streams | ok / requests | TTFA p50 / p99 ms | chunk latency p50 / p99 ms | underruns (ideal) | "
             "audio s/s | rows / push step | steps/s | worker busy | queue wait ms (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, run in runs.items():
        for n, f in run["levels"].items():
            st = (f.get("engine_stats") or {}).get("vocoder_service") or {}
            mean, per_s = st.get("mean", {}), st.get("per_s", {})

            def g(x, fmt="{:.1f}"):
                return fmt.format(x) if isinstance(x, (int, float)) else "–"

            lines.append(f"| {mode} | {n} | {f['ok']} / {f['requests']} | {f['ttfa_p50_ms']:.0f} / {f['ttfa_p99_ms']:.0f} | "
                         f"{f['chunk_latency_p50_ms']:.0f} / {f['chunk_latency_p99_ms']:.0f} | {f['underruns']} "
                         f"({f['ideal_underruns']}) | {f['audio_s_per_s']:.1f} | {g(mean.get('push_rows'))} | "
                         f"{g(per_s.get('worker_steps'))} | {g(st.get('busy_frac'), '{:.2f}')} | "
                         f"{g(mean.get('queue_wait_ms'))} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- GPU bench entry
def vocoder_only_section(model_dir: Path, levels: list[int], results: dict, *, device: str | None = None,
                         modes: Sequence[str] = ("burst", "realtime", "fast"), vocoder_flags: list[str] | None = None,
                         log_dir: Path | None = None, stats_log_s: float = 1.0, level_time_s: float | None = None,
                         sentence_tokens: int | None = None, ready_timeout_s: float = 900.0) -> None:
    """Only the vocoder service as a process on ``device`` (default cuda if available), then each mode's sweep.

    Writes ``results["vocoder_only"]``: ``config``, ``startup_s``, ``modes`` ({mode: {"rate_tps",
    "levels": {level: figures + engine_stats}}}) and ``exit_code``. Streams are 1 or 2 sentences of
    ``sentence_tokens`` (GPU 72, CPU 22: the services bench's ``max_new_tokens``) + 3 silence tokens;
    each level runs two rounds of its concurrency (starts spread over 1 s). On CPU, levels above
    ``service_load.CPU_MAX_LEVEL`` are skipped. The service logs its engine statistics every
    ``stats_log_s`` seconds (``TTS_STATS_LOG_S``) to ``log_dir/vocoder-service.log`` (a temporary
    folder if none), read back per level (bench/engine_stats.py).
    """
    import tempfile

    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device.startswith("cuda")
    sentence_tokens = sentence_tokens or (72 if on_gpu else 22)
    level_time_s = level_time_s or (45.0 if on_gpu else 30.0)
    skipped = [] if on_gpu else [n for n in levels if n > CPU_MAX_LEVEL]
    levels = [n for n in levels if n not in skipped] or [1]
    rates = {m: mode_rate(m) for m in modes}
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="vocoder-only-")
        log_dir = Path(tmp.name)
    out: dict[str, Any] = {"config": {"device": device, "levels": levels, "sentence_tokens": sentence_tokens,
                                      "stats_log_s": stats_log_s, "vocoder_flags": list(vocoder_flags or []),
                                      "level_time_s": level_time_s}, "modes": {}}
    if skipped:
        out["skipped_levels_on_cpu"] = skipped
    results["vocoder_only"] = out
    procs = ServiceProcesses(Path(model_dir), device=device, max_streams=max(levels),
                             vocoder_flags=list(vocoder_flags or []), log_dir=log_dir, ready_timeout_s=ready_timeout_s,
                             env={"TTS_STATS_LOG_S": str(stats_log_s)})
    log_path = log_dir / "vocoder-service.log"
    t0 = time.perf_counter()
    try:
        procs.start_vocoder()
        wait_healthy(procs.vocoder_target, procs.vocoder, ready_timeout_s, "vocoder service", log_path)
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        first = 0
        for i, (mode, rate) in enumerate(rates.items()):
            spec = VocodeSpec(rate_tps=rate, sentence_tokens=sentence_tokens, deadline_s=120.0 if on_gpu else 90.0)
            run = vocoder_sweep(procs.vocoder_target, levels, spec, level_time_s=level_time_s, ramp_s=1.0,
                                warmup=0 if i else min(8, max(levels)), first_index=first,
                                settle_s=stats_log_s + SETTLE_MARGIN_S, log=lambda m: print(m, flush=True))
            first += 10**5
            out["modes"][mode] = {"rate_tps": rate, "levels": run["levels"]}
    finally:
        out["exit_code"] = procs.stop().get("vocoder_service")
        for run in out["modes"].values():  # after stop: the final stats line is in the log
            attach(run["levels"], {"vocoder_service": log_path}, slack_s=stats_log_s + SETTLE_MARGIN_S / 2)
        out["stats_lines"] = len(read_stats(log_path))
        if tmp is not None:
            tmp.cleanup()
    print(table(out["modes"]), flush=True)


# ----------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = load_arg_parser("python -m bench.vocoder_load", __doc__.split("\n\n")[0], target="vocoder service",
                         spawn="the vocoder service", deadline_s=120.0)
    ap.add_argument("--modes", default="burst,realtime",
                    help="comma-separated: realtime (25 tok/s), burst (100 tok/s), fast (unpaced) or a rate in tok/s")
    ap.add_argument("--sentence-tokens", type=int, default=72, help="speech tokens per sentence (+3 silence)")
    ap.add_argument("--tokens-per-message", type=int, default=1)
    ap.add_argument("--vocoder-flags", default="", help="with --spawn: extra vocoder service flags (space-separated)")
    ap.add_argument("--stats-log-s", type=float, default=1.0, help="with --spawn: TTS_STATS_LOG_S (0: no engine stats)")
    args = ap.parse_args(argv)

    levels = [int(x) for x in args.concurrency.split(",") if x]
    modes = [m for m in args.modes.split(",") if m]
    try:
        rates = {m: mode_rate(m) for m in modes}
    except ValueError as exc:
        ap.error(str(exc))
    if args.tokens_per_message < 1 or args.sentence_tokens < 1:
        ap.error("--tokens-per-message and --sentence-tokens must be >= 1")
    procs = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop a spawned service
    log_path = None
    if args.spawn:
        import tempfile

        log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="vocoder-load-"))
        env = {"TTS_STATS_LOG_S": str(args.stats_log_s)} if args.stats_log_s > 0 else {}
        procs = ServiceProcesses(Path(args.spawn), device=args.device, max_streams=max(levels),
                                 vocoder_flags=args.vocoder_flags.split(), log_dir=log_dir, env=env)
        log_path = log_dir / "vocoder-service.log"
        procs.start_vocoder()
        try:
            wait_healthy(procs.vocoder_target, procs.vocoder, procs.ready_timeout_s, "vocoder service", log_path)
        except BaseException:
            procs.stop()
            raise
        target = procs.vocoder_target
    else:
        if not args.allow_remote:
            _check_loopback(args.target)
        target = args.target
    runs: dict[str, Any] = {}
    try:
        first = 0
        for i, (mode, rate) in enumerate(rates.items()):
            spec = VocodeSpec(rate_tps=rate, sentences=args.sentences, sentence_tokens=args.sentence_tokens,
                              tokens_per_message=args.tokens_per_message, deadline_s=args.deadline)
            print(f"vocoder load on {target}, mode {mode} ({rate:g} tok/s): levels {levels}", flush=True)
            runs[mode] = vocoder_sweep(target, levels, spec, requests=args.requests or None, rounds=args.rounds,
                                       level_time_s=args.level_time, ramp_s=args.ramp,
                                       warmup=0 if i else args.warmup, tolerance=args.tolerance_ms / 1000,
                                       first_index=first,
                                       settle_s=args.stats_log_s + SETTLE_MARGIN_S if procs and args.stats_log_s > 0 else 0.0)
            first += 10**5
    finally:
        if procs is not None:
            print(f"service stopped: exit code {procs.stop().get('vocoder_service')}")
            for run in runs.values():
                attach(run["levels"], {"vocoder_service": log_path}, slack_s=args.stats_log_s + SETTLE_MARGIN_S / 2)
    print_results(table(runs), runs, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
