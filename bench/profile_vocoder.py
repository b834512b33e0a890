"""Where a batched vocoder streaming step spends its time (GPU): host vs device, by part.

    PYTHONPATH=/tmp/site:$PWD python3 bench/profile_vocoder.py [--batches 1,8,32,64] [--dtype float16]

Each part of ``stream_step`` (noise, flow, HiFT F0, harmonic source, HiFT decode) is wrapped in a
timer that synchronises before and after, so the parts add up to the step's wall time; the rest is
host work between them (window assembly, per-row state updates, copies). Timers add a sync per
part, so the totals are a little above an unwrapped step's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMES: dict[str, float] = defaultdict(float)


def timed(name: str, fn):
    def run(*a, **k):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*a, **k)
        torch.cuda.synchronize()
        TIMES[name] += time.perf_counter() - t
        return out
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--work", default="/tmp/bench-work")
    ap.add_argument("--json", default="")
    ap.add_argument("--graph-batch", type=int, default=32, help="largest batch captured as one graph")
    ap.add_argument("--exact-windows", action="store_true", help="StreamConfig(pad_windows=False)")
    args = ap.parse_args()
    from export.demo_checkpoint import write_demo_checkpoint
    from vocoder_service.s3gen import streaming
    from vocoder_service.s3gen.accel import prepare_s3gen, warm_up_streaming
    from vocoder_service.s3gen.loading import load_vocoder

    d = Path(args.work) / "demo-turbo"
    if not d.exists():
        write_demo_checkpoint(d, "turbo", seed=0)
    model, voices = load_vocoder(d, None, device=torch.device("cuda"))
    prepare_s3gen(model, dtype=args.dtype, cuda_graphs=True, graph_batch=args.graph_batch)
    voice = voices["default"]
    cfg = streaming.StreamConfig(pad_windows=not args.exact_windows)
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    for b in model.graphs.flow.batch_buckets:  # what each bucket adds to the graph pool
        warm_up_streaming(model, voice, config=cfg, batch_sizes=(b,), n_tokens=args.tokens)
        torch.cuda.empty_cache()
        print(f"  captured bucket {b}: reserved {torch.cuda.memory_reserved() / 1e9:.2f} GB")
    print(f"warm-up (capture) {time.perf_counter() - t0:.1f} s; graphs {json.dumps(model.graphs.stats())[:300]}")
    print(f"memory: allocated {torch.cuda.memory_allocated() / 1e9:.2f} GB, reserved {torch.cuda.memory_reserved() / 1e9:.2f} GB")

    # wrap the parts
    g = model.graphs
    g.flow, g.f0, g.decode = timed("flow", g.flow), timed("hift.f0", g.f0), timed("hift.decode", g.decode)
    g.flow_padded = timed("flow", g.flow_padded)
    src = model.mel2wav.m_source
    src.forward = timed("hift.source", src.forward)  # a submodule: patch its forward
    streaming._cycles = timed("cycles", streaming._cycles)
    streaming.hashed_normal = timed("noise", streaming.hashed_normal)

    results = {}
    gen = torch.Generator().manual_seed(1)
    for b in batches:  # first chunk: b new sessions, 7 tokens each (first_chunk_tokens + look-ahead)
        times = []
        for rep in range(4):
            sessions = [streaming.StreamingSession(model, voice, seed=100 * rep + i, config=cfg) for i in range(b)]
            toks = torch.randint(0, 6561, (b, 7), generator=gen).tolist()
            torch.cuda.synchronize()
            t = time.perf_counter()
            streaming.push_batch(sessions, toks)
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t))
        print(json.dumps({"batch": b, "first_chunk_ms": [round(x, 2) for x in times]}))
    for b in batches:
        sessions = [streaming.StreamingSession(model, voice, seed=i, config=cfg) for i in range(b)]
        toks = torch.randint(0, 6561, (b, args.tokens), generator=gen).tolist()
        streaming.push_batch(sessions, [t[:78] for t in toks])  # past the growing chunks: steady shape
        TIMES.clear()
        torch.cuda.synchronize()
        t = time.perf_counter()
        steps, audio = 0, 0
        for i in range(78, args.tokens - 25, 25):
            outs = streaming.push_batch(sessions, [t_[i:i + 25] for t_ in toks])
            steps += 1
            audio += sum(o.numel() for o in outs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        parts = {k: round(1000 * v / steps, 2) for k, v in sorted(TIMES.items())}
        rest = 1000 * wall / steps - sum(parts.values())
        res = {"batch": b, "ms_per_step": round(1000 * wall / steps, 2), "audio_s_per_s": round(audio / 24000 / wall, 1),
               "parts_ms": parts, "other_host_ms": round(rest, 2)}
        results[b] = res
        print(json.dumps(res))
        for s in sessions:
            s.close()
    print(f"memory at end: allocated {torch.cuda.memory_allocated() / 1e9:.2f} GB, "
          f"reserved {torch.cuda.memory_reserved() / 1e9:.2f} GB, peak {torch.cuda.max_memory_reserved() / 1e9:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
