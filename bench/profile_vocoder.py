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

Batched pushes the way the service engine runs them (B sessions in one ``push_batch``), by part
and by kernel, with the split inside the graphs from an eager run (see ``profile_batched``):

    PYTHONPATH=/tmp/site:$PWD python3 bench/profile_vocoder.py --pushes 10 --push-batch 32 [--json out.json]
    .venv/bin/python bench/profile_vocoder.py --device cpu --preset tiny --pushes 3 --push-batch 4   # CPU smoke

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


def _wall_ms(setup, run, n: int, teardown=None) -> list[float]:
    """``n`` wall times (ms) of ``run()``, each after ``setup()`` (and followed by ``teardown()``),
    synchronised before and after."""
    walls = []
    for _ in range(n):
        setup()
        _sync()
        t = time.perf_counter()
        run()
        _sync()
        walls.append(1000 * (time.perf_counter() - t))
        if teardown is not None:
            teardown()
    return walls


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
        walls = _wall_ms(setup, run, n)  # wall: no profiler, no dispatch mode
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


# ---------------------------------------------------------------------------------------------
# --pushes N --push-batch B: where a batched push spends its device time, by part and by kernel
# ---------------------------------------------------------------------------------------------

PART_ORDER = ("flow.encoder", "flow.estimator", "flow", "hift.f0_predictor", "hift.f0+source", "hift.source",
              "hift.decode", "other")

KERNEL_KINDS = (  # (kind, name fragments) checked in order: the first match wins (a name heuristic)
    ("copy/cat/gather", ("memcpy", "memset", "copy_", "catarraybatchedcopy", "aten::cat", "index_kernel", "gather",
                         "aten::index", "aten::stack")),
    ("attention", ("fmha", "flash", "attention", "efficient", "cutlass_sdp", "sdpa")),
    ("fft", ("fft",)),
    ("conv", ("conv", "fprop", "implicit_gemm", "winograd", "dgrad", "im2col", "col2im", "cudnn")),
    ("gemm", ("gemm", "xmma", "cublas", "cutlass", "matmul", "wgmma", "s16816", "s1688", "addmm", "mm", "bmm")),
    ("norm", ("layer_norm", "layernorm", "norm")),
    ("softmax", ("softmax",)),
    ("reduce/scan", ("reduce", "scan", "cumsum")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "mul", "add", "silu", "gelu", "mish", "tanh",
                     "sin", "cos", "exp", "clamp", "where", "fill", "leaky", "elu", "abs", "bitwise", "shift",
                     "remainder", "div", "sub", "pow", "neg", "floor", "sqrt")),
)


def kernel_kind(name: str) -> str:
    """Rough class of a kernel (or, on CPU, an aten op) from its name: see ``KERNEL_KINDS``."""
    low = name.lower()
    for kind, frags in KERNEL_KINDS:
        if any(f in low for f in frags):
            return kind
    return "other"


class Fenced:
    """``fn`` called inside ``record_function(label)`` between two device syncs.

    The syncs make the range's host interval contain the device execution of every kernel the
    call queues (and of nothing queued before it), so a kernel belongs to the part whose range
    contains its device midpoint (``_attribute``) -- also for kernels replayed from a CUDA graph,
    which carry no range of their own. The syncs add host time, not kernel time; walls are
    measured without them. Attribute access falls through to ``fn`` (graph caches' counters)."""

    def __init__(self, label: str, fn):
        self.label, self.fn = label, fn

    def __call__(self, *a, **k):
        _sync()
        with torch.profiler.record_function(self.label):
            out = self.fn(*a, **k)
            _sync()
        return out

    def __getattr__(self, name):
        return getattr(self.fn, name)


GRAPH_PARTS = {  # model.graphs attribute -> part (graphed: one part per replayed graph)
    "flow": "flow", "flow_padded": "flow", "flow_noised": "flow", "flow_padded_noised": "flow",
    "f0": "hift.f0_predictor", "f0_source": "hift.source", "decode": "hift.decode",
}


def _fence_graphs(model) -> dict:
    """Graphed run: fence each graph cache (its input copies, replay and output clone are one
    part). The flow graph holds encoder + estimator and ``f0_source`` holds F0 predictor + source
    (+ their noise), so those pairs are reported together. Returns what to restore."""
    g = model.graphs
    saved = {}
    for name, part in GRAPH_PARTS.items():
        if hasattr(g, name):
            saved[name] = getattr(g, name)
            setattr(g, name, Fenced(part if part != "hift.source" else "hift.f0+source", saved[name]))
    return {"graphs": saved}


def _unfence_graphs(model, saved: dict) -> None:
    for name, fn in saved["graphs"].items():
        setattr(model.graphs, name, fn)


def _fence_eager(model) -> dict:
    """Eager run (no graphs): the same entry points ``stream_step`` calls, fenced as the outer
    parts, plus the modules inside them fenced as inner parts (an inner range wins): flow =
    embedding, encoder_proj, noise hash, prompt cond, ODE update (what is not encoder / estimator);
    hift.source = harmonic source + its noise hash + cycle counts (what ``f0_source`` does besides
    the F0 predictor). ``model.graphs`` becomes a namespace of fenced eager callables (what
    ``accel._graphed_or_eager`` looks up); module ``forward``s are shadowed per instance."""
    from types import SimpleNamespace

    flow, hift = model.flow, model.mel2wav
    fns = {"flow": ("flow", flow), "flow_padded": ("flow", flow.forward_padded),
           "flow_noised": ("flow", flow.forward_noised), "flow_padded_noised": ("flow", flow.forward_padded_noised),
           "f0": ("hift.f0_predictor", hift.f0_at_samples), "f0_source": ("hift.source", hift.f0_source),
           "decode": ("hift.decode", hift.decode)}
    saved = {"graphs": getattr(model, "graphs", None), "modules": []}
    model.graphs = SimpleNamespace(**{k: Fenced(label, fn) for k, (label, fn) in fns.items()})
    for mod, label in ((flow.encoder, "flow.encoder"), (flow.decoder.estimator, "flow.estimator"),
                       (hift.f0_predictor, "hift.f0_predictor"), (hift.m_source, "hift.source")):
        saved["modules"].append(mod)
        mod.forward = Fenced(label, mod.forward)  # instance attribute: nn.Module.__call__ finds it
    return saved


def _unfence_eager(model, saved: dict) -> None:
    model.graphs = saved["graphs"]
    for mod in saved["modules"]:
        del mod.forward


def _attribute(prof, labels: set[str], n: int, rows: int, cuda: bool, top: int = 15) -> dict:
    """Split the traced pushes' time by part and by kernel.

    Items: device kernels and memcpy / memset (CUDA), or aten ops by self CPU time (CPU). Each
    item inside a ``push`` range goes to the innermost part range (``Fenced``) containing its
    midpoint, else to ``other`` (window assembly, state updates, the audio copy, ...).
    """
    import bisect

    from torch.autograd import DeviceType

    evts = list(prof.events())
    ranges = sorted(((e.time_range.start, e.time_range.end, e.name) for e in evts
                     if e.device_type == DeviceType.CPU and (e.name in labels or e.name == "push")),
                    key=lambda r: (r[0], -r[1]))
    starts = [r[0] for r in ranges]
    items = []
    for e in evts:
        if cuda:
            # skip the ranges' own device-side copies (``gpu_user_annotation``): not kernels
            if e.device_type != DeviceType.CUDA or e.name in labels or e.name == "push" \
                    or getattr(e, "is_user_annotation", False):
                continue
            us = float(e.time_range.end - e.time_range.start)
        else:
            if e.device_type != DeviceType.CPU or not e.name.startswith("aten::"):
                continue
            us = float(e.self_cpu_time_total)
        items.append((e.name, (e.time_range.start + e.time_range.end) / 2, us))
    by_part: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, list] = {}
    by_kind: dict[str, float] = defaultdict(float)
    part_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, mid, us in items:
        part = None
        i = bisect.bisect_right(starts, mid) - 1
        while i >= 0:  # ranges nest: the innermost one containing mid is the last to start
            s, e_, label = ranges[i]
            if s <= mid <= e_:
                part = "other" if label == "push" else label
                break
            i -= 1
        if part is None:
            continue  # outside the pushes (sessions opened / closed between them)
        by_part[part] += us
        k = by_kernel.setdefault(name, [0.0, 0, defaultdict(float)])
        k[0] += us
        k[1] += 1
        k[2][part] += us
        by_kind[kernel_kind(name)] += us
        part_kind[part][kernel_kind(name)] += us
    total = sum(by_part.values()) or 1.0
    order = [p for p in PART_ORDER if p in by_part] + sorted(p for p in by_part if p not in PART_ORDER)
    parts = {p: {"ms_per_push": round(by_part[p] / n / 1000, 3), "ms_per_row": round(by_part[p] / n / rows / 1000, 4),
                 "pct": round(100 * by_part[p] / total, 1)} for p in order}
    kernels = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])
    return {
        "time_kind": "device kernels" if cuda else "aten ops, self CPU time",
        "total_ms_per_push": round(total / n / 1000, 3), "total_ms_per_row": round(total / n / rows / 1000, 4),
        "items_per_push": round(sum(v[1] for v in by_kernel.values()) / n, 1),
        "parts": parts,
        "kinds": {k: {"ms_per_push": round(v / n / 1000, 3), "pct": round(100 * v / total, 1)}
                  for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "kinds_by_part_ms_per_push": {p: {k: round(v / n / 1000, 3) for k, v in sorted(part_kind[p].items(),
                                                                                       key=lambda kv: -kv[1])}
                                      for p in order},
        # which SDPA backend ran where (flash_fwd*: flash; fmha_cutlass*: memory-efficient; cudnn*: cuDNN;
        # the math fallback shows as bmm + softmax kernels instead)
        "attention_and_softmax": [{"name": name[:160], "ms_per_push": round(us / n / 1000, 3),
                                   "calls_per_push": round(c / n, 2),
                                   "parts": {p: round(v / n / 1000, 3) for p, v in pp.items()}}
                                  for name, (us, c, pp) in kernels if kernel_kind(name) in ("attention", "softmax")],
        f"top{top}": [{"name": name[:160], "kind": kernel_kind(name), "ms_per_push": round(us / n / 1000, 3),
                       "calls_per_push": round(c / n, 2), "pct": round(100 * us / total, 1),
                       "part": max(pp.items(), key=lambda kv: kv[1])[0]}
                      for name, (us, c, pp) in kernels[:top]],
    }


def _trace(run, setup, teardown, n: int, cuda: bool):
    """Profile n pushes (``setup`` / ``teardown`` outside the ``push`` ranges)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync()
    with profile(activities=acts) as prof:
        for _ in range(n):
            setup()
            _sync()
            with torch.profiler.record_function("push"):
                run()
                _sync()
            teardown()
    return prof


def _print_table(title: str, t: dict) -> None:
    print(f"  {title}: {t['total_ms_per_push']:.3f} ms per push, {t['total_ms_per_row']:.4f} ms per row "
          f"({t['time_kind']}; {t['items_per_push']} per push)")
    for p, v in t["parts"].items():
        kinds = sorted(t["kinds_by_part_ms_per_push"].get(p, {}).items(), key=lambda kv: -kv[1])[:4]
        print(f"    {p:<18} {v['ms_per_push']:9.3f} ms/push {v['ms_per_row']:8.4f} ms/row {v['pct']:5.1f}%   "
              + ", ".join(f"{k} {ms:.2f}" for k, ms in kinds))
    print("    by kind: " + ", ".join(f"{k} {v['pct']}%" for k, v in t["kinds"].items()))
    for a in t["attention_and_softmax"][:6]:
        print(f"    attention/softmax: {a['ms_per_push']:8.3f} ms x{a['calls_per_push']:<6} {a['parts']} "
              f"{a['name'][:90]}")
    key = next(k for k in t if k.startswith("top"))
    print(f"    {key} ({'kernels' if t['time_kind'].startswith('device') else 'ops'}):")
    for k in t[key]:
        print(f"      {k['ms_per_push']:8.3f} ms {k['pct']:5.1f}% x{k['calls_per_push']:<7} {k['kind']:<11} "
              f"[{k['part']}] {k['name'][:100]}")


def profile_batched(args) -> None:
    """B sessions' steady pushes (and B first chunks) as one ``push_batch``, like the engine runs them.

    Setup as the service: the demo checkpoint of ``--preset``, ``prepare_s3gen(dtype, cuda_graphs,
    graph_batch)``, ``StreamConfig()`` (padded windows; ``--exact-windows`` turns them off), the
    shapes of batch B captured by ``warm_up_streaming`` first. Steady: B sessions past their
    growing chunks (78 tokens pushed: 53 committed, 25 pending); each push gives every session 25
    new tokens = one 25-token step per row (window: prompt + 50 context + 25 + 3 look-ahead).
    First chunk: B new sessions (opened and closed outside the timed / traced push) get 7 tokens.

    Per case: (1) wall ms per batched push, median of ``--pushes`` without profiler or fences;
    (2) time by part under ``torch.profiler``: on CUDA with graphs, each graph call fenced
    (``Fenced``: flow = encoder + estimator in one graph; hift.f0+source in one graph;
    hift.decode), then -- the split inside the graphs -- the same pushes eagerly (same dtype,
    padded windows, kernels) with the encoder, estimator, F0 predictor and source modules fenced
    too; ``flow_split_from_eager`` applies the eager encoder / estimator shares to the graphed
    flow time. Why this method: ``record_function`` ranges inside a captured function are not
    replayed, and all kernels of one replay share the graph launch's correlation id, but CUPTI
    still reports each replayed kernel with its device timestamps; with a device sync on both
    sides of each part, the part's host range contains exactly its kernels, so kernels are
    attributed by time (``_attribute``). The syncs cost host time only (walls are measured
    without them). (3) the top 15 kernels with calls, % and main part, the time by kernel kind
    (a name heuristic) per part, and every attention / softmax kernel (which SDPA backend ran:
    flash_fwd*, fmha_cutlass* = memory-efficient, cudnn*, or bmm + softmax = math).
    B above ``--graph-batch`` replays the graphs in slices, as the service does. On CPU
    (``--device cpu``, a smoke check) the run is eager and the times are aten ops' self CPU times.
    """
    import statistics

    from export.demo_checkpoint import write_demo_checkpoint
    from vocoder_service.s3gen import streaming
    from vocoder_service.s3gen.accel import prepare_s3gen, warm_up_streaming
    from vocoder_service.s3gen.loading import load_vocoder

    B, n = args.push_batch, args.pushes
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    if B < 1 or n < 1 or not wanted or set(wanted) - {"steady", "first_chunk"}:
        raise SystemExit(f"--push-batch and --pushes must be >= 1 and --cases a list of steady, first_chunk; "
                         f"got {B}, {n}, {args.cases!r}")
    d = Path(args.work) / f"demo-{args.preset}"
    if not d.exists():
        write_demo_checkpoint(d, args.preset, seed=0)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    model, voices = load_vocoder(d, None, device=dev)
    prepare_s3gen(model, dtype=args.dtype if cuda else "float32", cuda_graphs=cuda and not args.no_graphs,
                  graph_batch=args.graph_batch)
    voice = voices["default"]
    cfg = streaming.StreamConfig(pad_windows=not args.exact_windows)
    graphed = getattr(model, "graphs", None) is not None
    t0 = time.perf_counter()
    warm_up_streaming(model, voice, config=cfg, batch_sizes=(B,), n_tokens=args.tokens)
    info = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
            "preset": args.preset, "dtype": str(next(model.flow.parameters()).dtype), "cuda_graphs": graphed,
            "graph_batch": args.graph_batch, "batch": B, "pushes": n, "stream_config": str(cfg),
            "prompt_tokens": voice.n_prompt_tokens, "warm_up_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(info))
    gen = torch.Generator().manual_seed(1)
    seed = [10_000]

    def steady_case():
        sessions = [streaming.StreamingSession(model, voice, seed=i, config=cfg) for i in range(B)]
        streaming.push_batch(sessions, torch.randint(0, 6561, (B, 78), generator=gen).tolist())
        pend = {s.state.committed for s in sessions}
        assert pend == {53}, f"steady sessions should have committed 53 tokens, got {pend}"
        toks = [None]

        def setup():
            toks[0] = torch.randint(0, 6561, (B, 25), generator=gen).tolist()

        def run():
            outs = streaming.push_batch(sessions, toks[0])
            assert all(o.numel() == 25 * model.cfg.samples_per_token for o in outs), [o.numel() for o in outs]
        return setup, run, lambda: None

    def first_case():
        box = {}

        def setup():
            seed[0] += B
            box["s"] = [streaming.StreamingSession(model, voice, seed=seed[0] + i, config=cfg) for i in range(B)]
            box["t"] = torch.randint(0, 6561, (B, 7), generator=gen).tolist()

        def run():
            outs = streaming.push_batch(box["s"], box["t"])
            assert all(o.numel() > 0 for o in outs), "a first chunk gave no audio"

        def teardown():
            for s in box.pop("s"):
                s.close()
        return setup, run, teardown

    cases = {"steady": steady_case, "first_chunk": first_case}
    results = {"info": info}
    for name in wanted:
        setup, run, teardown = cases[name]()
        walls = _wall_ms(setup, run, n, teardown)
        wall = statistics.median(walls)
        audio_s = B * (25 if name == "steady" else 4) * model.cfg.samples_per_token / model.cfg.sample_rate
        res = {"wall_ms_median": round(wall, 3), "wall_ms_min": round(min(walls), 3),
               "wall_ms_per_row": round(wall / B, 4), "audio_s_per_s": round(audio_s / (wall / 1000), 1)}
        print(f"\n== {name}: batch {B}, wall {wall:.2f} ms per push (min {min(walls):.2f}), "
              f"{wall / B:.3f} ms per row, {res['audio_s_per_s']} audio s/s")
        labels = set(PART_ORDER) | {"hift.f0+source"}
        if graphed:
            r0 = _graph_replays(model)
            saved = _fence_graphs(model)
            try:
                prof = _trace(run, setup, teardown, n, cuda)
            finally:
                _unfence_graphs(model, saved)
            res["graph_replays_per_push"] = round((_graph_replays(model) - r0) / n, 2)
            res["graphed"] = _attribute(prof, labels, n, B, cuda)
            res["graphed"]["device_busy_pct_of_wall"] = round(100 * res["graphed"]["total_ms_per_push"] / wall, 1)
            _print_table("graphed (as served)", res["graphed"])
        if not graphed or not args.no_eager:
            saved = _fence_eager(model)
            try:
                prof = _trace(run, setup, teardown, n, cuda)
            finally:
                _unfence_eager(model, saved)
            res["eager"] = _attribute(prof, labels, n, B, cuda)
            _print_table("eager, module ranges" + (" (CPU smoke: aten self CPU time)" if not cuda else ""),
                         res["eager"])
        if "graphed" in res and "eager" in res:
            ep, gflow = res["eager"]["parts"], res["graphed"]["parts"].get("flow", {}).get("ms_per_push", 0.0)
            eflow = sum(ep.get(p, {}).get("ms_per_push", 0.0) for p in ("flow.encoder", "flow.estimator", "flow"))
            if eflow:
                res["flow_split_from_eager"] = {p: round(gflow * ep.get(p, {}).get("ms_per_push", 0.0) / eflow, 3)
                                                for p in ("flow.encoder", "flow.estimator", "flow")}
                print(f"  graphed flow {gflow:.3f} ms/push split by the eager shares: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in res["flow_split_from_eager"].items()))
        results[name] = res
    if cuda:
        print(f"memory: allocated {torch.cuda.memory_allocated() / 1e9:.2f} GB, reserved "
              f"{torch.cuda.memory_reserved() / 1e9:.2f} GB, peak {torch.cuda.max_memory_reserved() / 1e9:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


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
    ap.add_argument("--push-batch", type=int, default=0,
                    help="with --pushes: profile N batched pushes of this many sessions (steady 25-token rows "
                         "and first chunks) by part and kernel instead")
    ap.add_argument("--cases", default="steady,first_chunk", help="--push-batch: which cases, comma separated")
    ap.add_argument("--no-eager", action="store_true", help="--push-batch on CUDA: skip the eager module split")
    ap.add_argument("--no-graphs", action="store_true", help="--push-batch: prepare without CUDA graphs")
    args = ap.parse_args()
    if args.pushes and args.push_batch:
        profile_batched(args)
        return
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
