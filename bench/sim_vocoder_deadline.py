"""FIFO vs deadline-aware vocoder steps on CPU: TTFA and underruns with many streams (issue 6).

    python bench/sim_vocoder_deadline.py [--streams 128 | --arrivals 24] [--rate 4000] [--seconds 20] [--modes fifo,0.5/4]

A model of the engine, not of the GPU (bench/NOTES.md): the real ``VocoderEngine`` over a stand-in
backend that follows S3Gen's streaming schedule (first chunk 4 tokens, doubling to 25, 3 look-ahead;
``sim_vocoder_engine.Sched``) and "computes" each batched step by sleeping ``BASE_MS + ROW_MS *
(rows - 1)`` (H100 figures: ~13 ms for a batch-1 step, +~4.5 ms per extra row; finishes alike).

Load: ``--streams`` concurrent streams (closed loop: a new one starts when one ends; a stream whose
finish waits lives longer, so fewer start), or with ``--arrivals`` an open loop of that many new
streams per second (Poisson; the same offered load whatever the scheduling); each stream is a
random 3-6 s of audio (75-150 tokens). A token service stand-in hands out ``--rate`` tokens/s in
total every ``TICK_S``, shared evenly by the streams still generating (at most ``--cap`` tokens/s
each); a stream pushes whatever arrived since its last push (the engine's ``hold_pushes`` keeps what
cannot make audio yet), then ``finish()``. Each stream's client plays from its first audio in real
time and re-buffers when it runs dry; per stream: TTFA (stream start -> first audio, token time
included) and stall seconds. Streams started in the first ``WARMUP_S`` are not counted.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from sim_vocoder_engine import Sched  # noqa: E402
from vocoder_service.engine import VocoderEngine  # noqa: E402

BASE_MS, ROW_MS = 13.0, 4.5  # one step of n rows sleeps BASE_MS + ROW_MS * (n - 1)
TICK_S = 0.02  # the token service stand-in hands out tokens this often
WARMUP_S = 2.0
SR = 24_000


class Fake:
    def __init__(self):
        self.s = Sched()

    def push(self, ids):
        return push_batch([self], [ids])[0]

    def finish(self):
        return finish_batch([self])[0]

    def close(self):
        pass

    def tokens_needed(self):
        return max(1, self.s.next_chunk() + 3 - self.s.pending)


def _sleep_rows(n: int) -> None:
    time.sleep((BASE_MS + ROW_MS * (n - 1)) / 1000)


def push_batch(backends, lists):
    for b, ids in zip(backends, lists):
        b.s.pending += len(ids)
    outs = [0] * len(backends)
    while True:
        ready = [i for i, b in enumerate(backends) if b.s.ready()]
        if not ready:
            break
        _sleep_rows(len(ready))
        for i in ready:
            outs[i] += backends[i].s.step()
    return [np.zeros(960 * n, np.float32) for n in outs]


def finish_batch(backends):
    _sleep_rows(len(backends))
    outs = []
    for b in backends:
        outs.append(np.zeros(960 * b.s.pending, np.float32))
        b.s.pending = 0
    return outs


class Client:
    """A listener: plays from its first audio in real time, re-buffers when it runs dry."""

    def __init__(self, start: float):
        self.start = start
        self.first: float | None = None
        self.play_end = 0.0
        self.stall = 0.0

    def got(self, now: float, samples: int) -> None:
        if not samples:
            return
        if self.first is None:
            self.first, self.play_end = now, now
        elif now > self.play_end:
            self.stall += now - self.play_end
            self.play_end = now
        self.play_end += samples / SR


async def stream(engine, n_tokens: int, inbox: asyncio.Queue, clients: list) -> None:
    c = Client(time.perf_counter())
    clients.append(c)
    s = engine.open_session("default", seed=1)
    got = 0
    try:
        while got < n_tokens:
            k = await inbox.get()
            while not inbox.empty():
                k += inbox.get_nowait()  # merge what arrived while the last push ran
            got += k
            c.got(time.perf_counter(), (await s.push([1] * k)).size)
        c.got(time.perf_counter(), (await s.finish()).size)
    finally:
        s.close()


async def run(mode: str, n_streams: int, rate: float, cap: float, seconds: float, arrivals: float = 0.0,
              seed: int = 0) -> dict:
    if mode == "fifo":
        kw = {"urgent_slack_s": 0.0}
    else:
        slack, fill = mode.split("/")
        kw = {"urgent_slack_s": float(slack), "urgent_fill": int(fill)}
    eng = VocoderEngine(lambda v, s: Fake(), ["default"], step_batch=push_batch, finish_batch=finish_batch,
                        stats_window_s=3600, **kw)
    rng = random.Random(seed)
    clients: list[Client] = []
    generating: dict[int, list] = {}  # id -> [inbox, tokens left, fractional credit]
    tasks: set[asyncio.Task] = set()
    peak = [0]  # most streams open at once
    t0 = time.perf_counter()
    stop = t0 + seconds

    def launch() -> None:
        n = rng.randint(75, 150)
        inbox: asyncio.Queue = asyncio.Queue()
        key = object()
        generating[id(key)] = [inbox, n, 0.0, key]
        task = asyncio.ensure_future(stream(eng, n, inbox, clients))
        tasks.add(task)
        peak[0] = max(peak[0], len(tasks))

        def done(t):
            tasks.discard(t)
            if not arrivals and time.perf_counter() < stop:
                launch()  # closed loop: a new stream when one ends
        task.add_done_callback(done)

    async def poisson() -> None:  # open loop: streams arrive at a fixed mean rate, whatever ends
        while True:
            await asyncio.sleep(rng.expovariate(arrivals))
            if time.perf_counter() >= stop:
                return
            launch()

    async def token_service() -> None:
        while time.perf_counter() < stop or generating:
            await asyncio.sleep(TICK_S)
            if not generating:
                continue
            each = min(cap, rate / len(generating)) * TICK_S
            for key, g in list(generating.items()):
                g[2] += each
                k = min(int(g[2]), g[1])
                if k:
                    g[2] -= k
                    g[1] -= k
                    g[0].put_nowait(k)
                if g[1] == 0:
                    del generating[key]

    gen = asyncio.ensure_future(token_service())
    if arrivals:
        opener = asyncio.ensure_future(poisson())
    else:
        for _ in range(n_streams):  # the first streams arrive over one second
            asyncio.get_running_loop().call_later(rng.random(), launch)
    await asyncio.sleep(seconds)
    if arrivals:
        await opener
    while tasks:
        await asyncio.gather(*list(tasks))
    await gen
    wall = time.perf_counter() - t0
    st = eng.stats()
    eng.shutdown()
    counted = [c for c in clients if c.start >= t0 + WARMUP_S and c.first is not None]
    ttfa = sorted(1000 * (c.first - c.start) for c in counted)
    stalls = [c.stall for c in counted]
    return {"mode": mode, "streams": len(counted), "ttfa_p50": _pct(ttfa, 50), "ttfa_p99": _pct(ttfa, 99),
            "underrun_streams": sum(s > 0.001 for s in stalls), "stall_s": sum(stalls),
            "audio_s_per_s": st["tokens"] * 0.04 / wall,
            "rows_per_step": (st["push_rows"]["sum"] + st["finish_rows"]["sum"]) / max(1, st["worker_steps"]),
            "busy": st["busy_s"] / wall, "urgent": st["urgent_rows"]["sum"] / max(1, st["urgent_rows"]["n"]),
            "deferred": st["deferred_rows"]["sum"] / max(1, st["deferred_rows"]["n"]), "aged": st["aged_rows"], "peak": peak[0]}


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, max(0, int(np.ceil(q / 100 * len(xs))) - 1))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=128)
    ap.add_argument("--rate", type=float, default=3000.0, help="token service tokens/s in total")
    ap.add_argument("--cap", type=float, default=100.0, help="most tokens/s one stream gets")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--arrivals", type=float, default=0.0,
                    help="open loop: new streams per second (Poisson) instead of --streams concurrent ones")
    ap.add_argument("--modes", default="fifo,0.5/4", help="fifo or <urgent_slack_s>/<urgent_fill>, comma-separated")
    args = ap.parse_args()
    for mode in args.modes.split(","):
        r = asyncio.run(run(mode, args.streams, args.rate, args.cap, args.seconds, args.arrivals))
        load = f"{args.arrivals:4.1f}/s" if args.arrivals else f"{args.streams:3d}"
        print(f"streams {load} rate {args.rate:5.0f} {mode:>8}: TTFA p50 {r['ttfa_p50']:6.0f} ms "
              f"p99 {r['ttfa_p99']:6.0f} ms | underrun streams {r['underrun_streams']:3d}/{r['streams']:3d} "
              f"stall {r['stall_s']:6.1f} s | {r['audio_s_per_s']:5.1f} audio s/s, busy {r['busy']:.2f}, "
              f"{r['rows_per_step']:4.1f} rows/step, urgent {r['urgent']:4.1f} deferred {r['deferred']:4.1f} per step, "
              f"aged {r['aged']}, peak streams {r['peak']}",
              flush=True)


if __name__ == "__main__":
    main()
