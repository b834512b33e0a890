"""Where a batched vocoder streaming step spends its time (GPU): host vs device, by part.

    PYTHONPATH=/tmp/site:$PWD python3 bench/profile_vocoder.py [--batches 1,8,32,64] [--dtype float16]

Batch-1 pushes under ``torch.profiler`` (CUDA activities), for old and new trees alike:

    PYTHONPATH=/tmp/site:$PWD python3 bench/profile_vocoder.py --pushes 30 [--json out.json]

profiles one new session's first chunk (7 tokens: 4 + 3 look-ahead; the push the first audio
waits for) and a steady 25-token push, and prints per push: wall ms (median of ``--pushes``,
measured without the profiler), device kernels executed (inside graphs too) and their total
time, host API calls (kernel launches, graph launches, memcpys, syncs), eager aten ops (a
``TorchDispatchMode``: everything outside the graph replays, the caches' input copies included),
graph replays, and the top 10 CUDA kernels by time. Only APIs every tree has are required (graph
caches are found by their ``replays`` counter), so the script can be copied into an older tree.

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


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _graph_replays(model) -> int:
    g = getattr(model, "graphs", None)
    if g is None:
        return 0
    return sum(int(getattr(c, "replays", 0)) for c in vars(g).values() if hasattr(c, "replays"))


def _count_eager_ops(fn) -> int:
    """aten ops dispatched while ``fn`` runs (a graph replay dispatches none; its input copies do)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def _device_time_us(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


API_GROUPS = {  # host-side CUDA runtime / driver calls seen by the profiler, by what they do
    "kernel_launches": ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"),
    "graph_launches": ("cudaGraphLaunch", "cuGraphLaunch"),
    "memcpy": ("cudaMemcpyAsync", "cudaMemcpy", "cuMemcpyAsync", "cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync"),
    "syncs": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize"),
}


def _profile(run, n: int) -> dict:
    """Profile ``n`` calls of ``run()`` (each one push); per-push counts and the top CUDA kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            run()
        _sync()
    kernels, kernel_us, api = 0, 0.0, {k: 0 for k in API_GROUPS}
    memcpy_dev = {}
    top = []
    for evt in prof.key_averages():
        if evt.device_type == DeviceType.CUDA:
            us = _device_time_us(evt)
            if evt.key.startswith("Memcpy") or evt.key.startswith("Memset"):
                memcpy_dev[evt.key] = round(evt.count / n, 2)
                continue
            kernels += evt.count
            kernel_us += us
            top.append((us, evt.count, evt.key))
        else:
            for group, names in API_GROUPS.items():
                if evt.key in names:
                    api[group] += evt.count
    top.sort(reverse=True)
    return {"device_kernels_per_push": round(kernels / n, 1), "device_kernel_ms_per_push": round(kernel_us / n / 1000, 3),
            "host_api_calls_per_push": {k: round(v / n, 2) for k, v in api.items()},
            "device_memcpy_memset_per_push": memcpy_dev,
            "top10_kernels": [{"name": k[:110], "per_push": round(c / n, 2), "us_per_push": round(us / n, 1)}
                              for us, c, k in top[:10]]}


def profile_pushes(args) -> None:
    """Batch-1 first chunk and steady push, on any tree (see the module docstring)."""
    import dataclasses
    import inspect
    import statistics

    from export.demo_checkpoint import write_demo_checkpoint
    from vocoder_service.s3gen import streaming
    from vocoder_service.s3gen.accel import prepare_s3gen, warm_up_streaming
    from vocoder_service.s3gen.loading import load_vocoder

    d = Path(args.work) / f"demo-{args.preset}"
    if not d.exists():
        write_demo_checkpoint(d, args.preset, seed=0)
    dev = torch.device(args.device)
    model, voices = load_vocoder(d, None, device=dev)
    kw = {"graph_batch": args.graph_batch} if "graph_batch" in inspect.signature(prepare_s3gen).parameters else {}
    graphs = dev.type == "cuda"  # a CPU run only checks the script (no graphs, no CUDA kernels)
    prepare_s3gen(model, dtype=args.dtype if graphs else "float32", cuda_graphs=graphs, **(kw if graphs else {}))
    voice = voices["default"]
    fields = {f.name for f in dataclasses.fields(streaming.StreamConfig)}
    cfg = streaming.StreamConfig(**({"pad_windows": False} if args.exact_windows and "pad_windows" in fields else {}))
    t0 = time.perf_counter()
    warm_up_streaming(model, voice, config=cfg, batch_sizes=(1,), n_tokens=args.tokens)
    print(f"warm-up (capture, batch 1) {time.perf_counter() - t0:.1f} s; config {cfg}")
    gen = torch.Generator().manual_seed(1)
    n = args.pushes
    seed = [1000]

    def first_chunk_case():
        """A new session per push (opened outside the timed call); the push is its first chunk."""
        state = {}

        def setup():
            seed[0] += 1
            state["s"] = streaming.StreamingSession(model, voice, seed=seed[0], config=cfg)
            state["t"] = torch.randint(0, 6561, (7,), generator=gen).tolist()

        def run():
            out = streaming.push_batch([state["s"]], [state["t"]])
            assert out[0].numel() > 0, "the first chunk gave no audio"
            state["s"].close()
        return setup, run

    def steady_case():
        """One session past the growing chunks; each push is one steady 25-token step."""
        sess = streaming.StreamingSession(model, voice, seed=7, config=cfg)
        toks = torch.randint(0, 6561, (78 + 25 * (4 * n + 8),), generator=gen).tolist()
        streaming.push_batch([sess], [toks[:78]])
        pos = [78]

        def setup():
            pass

        def run():
            i = pos[0]
            out = streaming.push_batch([sess], [toks[i:i + 25]])
            assert out[0].numel() == 25 * 960, out[0].numel()
            pos[0] += 25
        return setup, run

    results = {}
    for name, make in (("first_chunk", first_chunk_case), ("steady_25", steady_case)):
        setup, run = make()
        walls = []
        for _ in range(n):  # wall: no profiler, no dispatch mode
            setup()
            _sync()
            t = time.perf_counter()
            run()
            _sync()
            walls.append(1000 * (time.perf_counter() - t))
        setup()
        r0 = _graph_replays(model)
        ops = _count_eager_ops(run)
        replays = _graph_replays(model) - r0
        if name == "first_chunk":  # the pushes alone: their sessions are opened before the trace
            prof = _profile_first_chunks(model, voice, cfg, streaming, gen, n, seed)
        else:
            prof = _profile(run, n)
        res = {"case": name, "wall_ms_median": round(statistics.median(walls), 2),
               "wall_ms_min": round(min(walls), 2), "eager_aten_ops_per_push": ops,
               "graph_replays_per_push": replays, **prof}
        results[name] = res
        print(json.dumps({k: v for k, v in res.items() if k != "top10_kernels"}))
        for k in res["top10_kernels"]:
            print(f"    {k['us_per_push']:9.1f} us  x{k['per_push']:<6} {k['name']}")
    if graphs:
        print(f"memory: allocated {torch.cuda.memory_allocated() / 1e9:.2f} GB, reserved "
              f"{torch.cuda.memory_reserved() / 1e9:.2f} GB; graphs {json.dumps(model.graphs.stats())[:600]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _profile_first_chunks(model, voice, cfg, streaming, gen, n: int, seed: list) -> dict:
    """``_profile`` of n first-chunk pushes, the sessions opened (and their tokens drawn) before the trace."""
    sessions = []
    for _ in range(n):
        seed[0] += 1
        sessions.append((streaming.StreamingSession(model, voice, seed=seed[0], config=cfg),
                         torch.randint(0, 6561, (7,), generator=gen).tolist()))
    it = iter(sessions)

    def run():
        s, t = next(it)
        streaming.push_batch([s], [t])
    out = _profile(run, n)
    for s, _ in sessions:
        s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--work", default="/tmp/bench-work")
    ap.add_argument("--json", default="")
    ap.add_argument("--graph-batch", type=int, default=32, help="largest batch captured as one graph")
    ap.add_argument("--exact-windows", action="store_true", help="StreamConfig(pad_windows=False)")
    ap.add_argument("--device", default="cuda", help="--pushes only: cpu checks the script without a GPU")
    ap.add_argument("--preset", default="turbo", help="--pushes only: demo checkpoint preset (tiny for a CPU check)")
    ap.add_argument("--pushes", type=int, default=0,
                    help="profile N batch-1 first-chunk and steady pushes with torch.profiler instead (any tree)")
    args = ap.parse_args()
    if args.pushes:
        profile_pushes(args)
        return
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
    for name, part in (("flow_noised", "flow"), ("flow_padded_noised", "flow"), ("f0_source", "hift.f0_source")):
        if hasattr(g, name):  # the default path: noise hashed inside these graphs
            setattr(g, name, timed(part, getattr(g, name)))
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
