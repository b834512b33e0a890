"""One GPU benchmark: builds, checks and times everything, ours beside upstream, in one call.

Run on the device machine through ``bench/run_gpu.sh`` (installs the carried wheels, makes the
protobuf code, then runs this).  Sections run in order; one that fails records its error and the
others still run.  Writes ``perf.json`` and ``PERF.md`` into ``--out`` and prints the table last.

Sections
  setup      demo turbo checkpoint (random weights, seed 0) — both sides load the same files
  upstream   chatterbox-tts 0.1.7 fp32 eager: T3 tokens/s at batch 1, S3Gen per utterance,
             end-to-end ``generate`` (which also watermarks), peak memory, greedy reference tokens
  t3         our engine (bf16, CUDA graphs): tokens/s at batch 1, time to first token, batch sweep;
             with --t3-compile (default on CUDA) also the torch.compile'd decode step: batch-1
             tokens/s, graph replay ms, kernels per step and greedy agreement with the eager engine;
             --t3-kernels triton runs the main engine on the Triton decode step, ``both`` times it
             beside the torch step (same numbers as for the compiled step); --t3-overlap both (default)
             also times each step's engine with ``overlap_steps`` (step N+1 queued before step N's ids
             are read; --t3-overlap-depth D keeps D steps queued ahead of the one read): batch-1
             tokens/s, TTFT, engine-thread split, greedy tokens equal to the serial engine's
  accuracy   greedy agreement ours-bf16 / ours-fp32 vs upstream-fp32; logits error bf16 vs fp32;
             with --t3-kernels triton|both also the Triton bf16 engine vs upstream-fp32, ours-fp32, ours-bf16
  s3gen      our S3Gen: offline per utterance, streaming first-chunk latency, half-precision error
  services   both gRPC services as processes (--colocate on|both: also as ONE process, ``services_colocated``):
             time to first audio, concurrency sweep, memory;
             with --stats-log-s (default 1) each level also has both engines' statistics
             (``engine_stats``: vocoder rows per step, steps/s, worker busy, queue waits; T3 steps, tokens/s)
  vocoder_only  (with --vocoder-only-sweep LEVELS) only the vocoder service, driven by synthetic token
             streams (bench/vocoder_load.py; modes --vocoder-only-modes), engine statistics per level
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: dict[str, Any] = {"errors": {}}
T_START = time.perf_counter()
TEXTS = [
    "Hello there, thanks for calling. How can I help you today?",
    "The quick brown fox jumps over the lazy dog, and then it runs back home to rest by the fire.",
    "Streaming speech synthesis starts talking before the whole sentence has been written.",
    "Please hold while I look up your order number in our system.",
]


DEVICE = "cuda"
PRESET = "turbo"
T3_KERNELS = "both"  # --t3-kernels: torch | triton | both
T3_OVERLAP = "both"  # --t3-overlap: off | on | both (engines with EngineConfig.overlap_steps)
T3_OVERLAP_DEPTH = 1  # --t3-overlap-depth: EngineConfig.overlap_depth of the overlapped engines


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def section(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        def run(*a, **k):
            t0 = time.perf_counter()
            print(f"== {name} (t={time.perf_counter() - T_START:.0f}s)", flush=True)
            try:
                return fn(*a, **k)
            except Exception as e:  # keep going: record and continue with the next section
                RESULTS["errors"][name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            finally:
                RESULTS.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
                release_memory()
        return run
    return wrap


def median_time(fn: Callable[[], Any], reps: int = 3) -> float:
    """Median wall time of ``fn`` over ``reps`` runs after one warm-up run, device synchronised."""
    ts = []
    for rep in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if rep:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def release_memory() -> None:
    """Collect dropped engines and hand their cached CUDA blocks back (between engines in one section)."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def peak_reset() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


# --------------------------------------------------------------------------------------- setup
@section("setup")
def setup(work: Path) -> Path:
    from export.demo_checkpoint import write_demo_checkpoint

    d = work / f"demo-{PRESET}"
    if not d.exists():
        write_demo_checkpoint(d, PRESET, seed=0)
    RESULTS["gpu"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    RESULTS["torch"] = torch.__version__
    if DEVICE != "cuda":
        return d
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync()
    RESULTS["copy_bandwidth_GBps"] = 2 * 2**30 * 20 / (time.perf_counter() - t0) / 1e9
    del x, y
    return d


# ------------------------------------------------------------------------------------ upstream
@section("upstream")
@torch.inference_mode()
def upstream(model_dir: Path, n_tokens: int) -> None:
    from chatterbox.tts_turbo import ChatterboxTurboTTS, punc_norm

    torch.cuda.reset_peak_memory_stats()
    tts = ChatterboxTurboTTS.from_local(model_dir, "cuda")
    print("  upstream loaded", flush=True)
    r: dict[str, Any] = {}
    ids = [tts.tokenizer(punc_norm(t), return_tensors="pt").input_ids.cuda() for t in TEXTS]
    RESULTS["text_ids"] = [i[0].tolist() for i in ids]
    # T3 tokens/s at batch 1 (upstream's own sampling defaults; capped length)
    tps = []
    for rep, t in enumerate(ids[:3] * 2):
        torch.manual_seed(rep)
        sync()
        t0 = time.perf_counter()
        out = tts.t3.inference_turbo(t3_cond=tts.conds.t3, text_tokens=t, max_gen_len=n_tokens)
        sync()
        if rep:
            tps.append(out.shape[1] / (time.perf_counter() - t0))
    r["t3_tokens_per_s_bs1"] = statistics.median(tps)
    # greedy reference tokens for the accuracy section
    greedy = []
    for t in ids:
        out = tts.t3.inference_turbo(t3_cond=tts.conds.t3, text_tokens=t, top_k=1, max_gen_len=63)
        greedy.append(out[0].tolist())
    RESULTS["upstream_greedy"] = greedy
    # S3Gen offline per utterance
    for n in (50, 150):
        tok = torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(n)).cuda()
        r[f"s3gen_s_{n}tok"] = median_time(lambda: tts.s3gen.inference(speech_tokens=tok, ref_dict=tts.conds.gen, n_cfm_timesteps=2))
    # end to end generate (T3 + S3Gen + watermark), seconds of audio per wall second
    e2e = []
    for rep, text in enumerate(TEXTS[:2] * 2):
        torch.manual_seed(rep)
        sync()
        t0 = time.perf_counter()
        wav = tts.generate(text)
        sync()
        if rep >= 2:
            e2e.append({"wall_s": time.perf_counter() - t0, "audio_s": wav.shape[-1] / 24000})
    r["e2e"] = e2e
    r["peak_gpu_mem_GB"] = torch.cuda.max_memory_allocated() / 1e9
    RESULTS["upstream"] = r
    del tts


# ------------------------------------------------------------------------------------------ t3
def _engine(model_dir: Path, dtype: str, graphs: bool, max_slots: int, compile: bool = False,
            compile_mode: str = "default", kernels: str = "torch", overlap: bool | None = None):
    """``overlap`` None: ``overlap_steps`` as --t3-overlap says for the main engines (on only for ``on``)."""
    from token_service.engine.llm_engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model_dir=model_dir, device=DEVICE, dtype=dtype, cuda_graphs=graphs,
                                  max_slots=max_slots, max_waiting=1024, max_seq_len=2048,
                                  compile=compile, compile_mode=compile_mode, kernels=kernels,
                                  overlap_steps=T3_OVERLAP == "on" if overlap is None else overlap,
                                  overlap_depth=T3_OVERLAP_DEPTH))


async def _run_one(engine, ids, params) -> tuple[list[int], float, float]:
    t0 = time.perf_counter()
    first = None
    toks: list[int] = []
    async for chunk in engine.generate("default", ids, params):
        if first is None:
            first = time.perf_counter() - t0
        toks.extend(chunk)
    return toks, first or float("nan"), time.perf_counter() - t0


def _tdiff(a: dict, b: dict) -> dict:
    """Engine-thread time split between two ``engine.timings()`` snapshots, with per-call ms."""
    d = {k: a[k] - b.get(k, 0) for k in a if k != "kv_gb"}
    out = {k: round(v, 3) for k, v in d.items()}
    if d.get("prefills"):
        out["prefill_ms_each"] = round(1000 * d["prefill_s"] / d["prefills"], 2)
    if d.get("decodes"):
        out["decode_ms_each"] = round(1000 * d["decode_s"] / d["decodes"], 3)
        out["emit_ms_each"] = round(1000 * d["emit_s"] / d["decodes"], 3)
    out["kv_gb"] = round(a["kv_gb"], 2)
    return out


def _replay_ms(group, n: int, kv: int, reps: int = 200) -> float | None:
    """GPU time of one captured decode step (engine idle; touches only idle rows' state)."""
    gr = group.graphs.get((n, kv))
    if gr is None:
        return None
    from bench.replay_timing import graph_replay_ms

    return round(graph_replay_ms(gr, reps, warmup=1), 4)


@torch.inference_mode()
def _step_replay_ms(eng, group, n: int, kv: int) -> float | None:
    """:func:`_replay_ms` of the graph a decode of ``n`` rows attending to ``kv`` positions replays: the
    torch step's (n, kv) graph, or the Triton step's one graph per batch size with the (idle) rows
    set to position ``kv - 1`` (it reads only the positions it attends to)."""
    r = eng.runner
    key = r.decode_key(n, kv - 1, group)
    if r.fused_serves(n):
        r.positions[group.start:group.start + n] = kv - 1
    try:
        return _replay_ms(group, *key)
    finally:
        if r.fused_serves(n):
            r._reset_rows(group)


@torch.inference_mode()
def _kernels_per_step(eng, n: int, kv: int, steps: int = 5) -> float | None:
    """Device kernels one (uncaptured) decode step of group 0 launches (torch.profiler; engine idle)."""
    if DEVICE != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    r, g = eng.runner, eng.runner.groups[0]
    r._reset_rows(g)  # released rows keep their last positions until the engine's next step
    r._decode_body(g, n, kv)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            r._decode_body(g, n, kv)
        sync()
    r._reset_rows(g)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / steps


def _greedy(eng, ids: list[list[int]], n: int = 64) -> list[list[int]]:
    from token_service.t3.sampling import SamplingParams

    async def go():
        return [(await _run_one(eng, i, SamplingParams(top_k=1, max_new_tokens=n, seed=0)))[0] for i in ids]
    return asyncio.run(go())


def _agreement(got: list[list[int]], ref: list[list[int]]) -> list[dict]:
    out = []
    for a, b in zip(got, ref):
        n = min(len(a), len(b))
        first_diff = next((k for k in range(n) if a[k] != b[k]), n)
        out.append({"compared": n, "first_mismatch": first_diff,
                    "match_frac": sum(x == y for x, y in zip(a, b)) / max(n, 1)})
    return out


async def _bs1_runs(eng, ids, n_tokens: int, reps: int = 6) -> list[tuple[int, float, float]]:
    """``reps`` batch-1 generations (the first one is a warm-up, dropped): (tokens, ttft s, total s)."""
    from token_service.t3.sampling import SamplingParams

    out = []
    for rep in range(reps):
        p = SamplingParams(max_new_tokens=n_tokens, seed=rep)
        toks, ttft, total = await _run_one(eng, ids[rep % 3], p)
        if rep:
            out.append((len(toks), ttft, total))
    return out


def _tokens_per_s(runs: list[tuple[int, float, float]]) -> float:
    """Decode rate after the first token, median over runs."""
    return statistics.median([(n - 1) / (tot - f) for n, f, tot in runs if n > 1])


def _variant_bs1(eng, ids, n_tokens: int, r: dict, suffix: str, base: str, greedy_base: str) -> None:
    """A decode-step variant's engine ``eng``: batch-1 tokens/s and TTFT, and greedy agreement with the
    main engine's tokens (``r["greedy_eager"]``), as ``r[..._<suffix>]``; ``base`` names the main step."""
    runs = asyncio.run(_bs1_runs(eng, ids, n_tokens))
    r[f"batch1_tokens_per_s_{suffix}"] = _tokens_per_s(runs)
    r[f"t3_ttft_ms_bs1_{suffix}"] = statistics.median([f * 1000 for _, f, _ in runs])
    r[f"greedy_tokens_{suffix}"] = _greedy(eng, ids)
    r[f"greedy_{suffix}_vs_eager"] = _agreement(r[f"greedy_tokens_{suffix}"], r["greedy_eager"])
    print(f"  {suffix} bs1 {r[f'batch1_tokens_per_s_{suffix}']:.0f} tok/s ({base} {r.get('t3_tokens_per_s_bs1', 0):.0f}); "
          f"greedy vs {greedy_base} {r[f'greedy_{suffix}_vs_eager']}", flush=True)


def t3_triton(model_dir: Path, n_tokens: int, eager, r: dict) -> None:
    """The Triton decode step next to the torch one (``eager``: the main engine, idle): batch-1
    tokens/s, graph replay, kernels per step, greedy agreement with the torch bf16 engine."""
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    ids = RESULTS.get("text_ids") or [eager.tokenize(t) for t in TEXTS]
    r.setdefault("greedy_eager", _greedy(eager, ids))
    r.setdefault("decode_kernels_per_step", {"1x512": _kernels_per_step(eager, 1, 512)})
    t_build = time.perf_counter()
    eng = _engine(model_dir, dtype, DEVICE == "cuda", 8 if DEVICE == "cuda" else 1, kernels="triton")
    try:
        r["engine_build_s_triton"] = round(time.perf_counter() - t_build, 1)
        r["kernels_status"] = eng.kernels_status
        print(f"  triton engine built in {r['engine_build_s_triton']}s: {eng.kernels_status}", flush=True)
        if DEVICE == "cuda":
            g = eng.runner.groups[0]
            r["decode_graph_ms_triton"] = {f"{n}x{kv}": _step_replay_ms(eng, g, n, kv)
                                           for n, kv in ((1, 512), (1, 1024), (8, 512))}
            r["decode_kernels_per_step_triton"] = {"1x512": _kernels_per_step(eng, 1, 512)}
            print(f"  triton graph replay ms/step: {r['decode_graph_ms_triton']}; kernels/step "
                  f"{r['decode_kernels_per_step']} -> {r['decode_kernels_per_step_triton']}", flush=True)
        _variant_bs1(eng, ids, n_tokens, r, "triton", base="torch", greedy_base="torch bf16")
    finally:
        eng.close()
        del eng  # the caller's reference: only then can the collector free the engine's tensors
        release_memory()


def t3_compiled(model_dir: Path, n_tokens: int, eager, r: dict, mode: str) -> None:
    """The torch.compile'd decode step next to the eager one (``eager``: the main engine, idle):
    batch-1 tokens/s, graph replay, kernels per step, greedy agreement on the bench texts."""
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    ids = RESULTS.get("text_ids") or [eager.tokenize(t) for t in TEXTS]
    r["greedy_eager"] = _greedy(eager, ids)
    r["decode_kernels_per_step"] = {"1x512": _kernels_per_step(eager, 1, 512)}
    t_build = time.perf_counter()
    # 8 slots = the main engine's first KV group (same shapes); on CPU one slot (one compile per segment)
    eng = _engine(model_dir, dtype, DEVICE == "cuda", 8 if DEVICE == "cuda" else 1, compile=True, compile_mode=mode)
    try:
        r["compile_mode"] = mode
        r["engine_build_s_compiled"] = round(time.perf_counter() - t_build, 1)
        r["compile_status"] = eng.compile_status
        print(f"  compiled engine built in {r['engine_build_s_compiled']}s: {eng.compile_status}", flush=True)
        if DEVICE == "cuda":
            g = eng.runner.groups[0]
            r["decode_graph_ms_compiled"] = {"1x512": _replay_ms(g, 1, 512), "8x512": _replay_ms(g, 8, 512)}
            r["decode_kernels_per_step_compiled"] = {"1x512": _kernels_per_step(eng, 1, 512)}
            print(f"  compiled graph replay ms/step: {r['decode_graph_ms_compiled']}; kernels/step "
                  f"{r['decode_kernels_per_step']} -> {r['decode_kernels_per_step_compiled']}", flush=True)
        _variant_bs1(eng, ids, n_tokens, r, "compiled", base="eager", greedy_base="eager")
    finally:
        eng.close()
        del eng  # the caller's reference: only then can the collector free the engine's tensors
        release_memory()


def t3_overlap(model_dir: Path, n_tokens: int, ids, kernels: str, r: dict, suffix: str, serial_suffix: str,
               serial_greedy: list[list[int]]) -> None:
    """An engine with ``overlap_steps`` on and the ``kernels`` step, next to the same step's serial
    engine (``r[...{serial_suffix}]``, greedy tokens ``serial_greedy``): batch-1 tokens/s and TTFT,
    engine-thread split, and whether its greedy tokens equal the serial engine's (they must)."""
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    t_build = time.perf_counter()
    eng = _engine(model_dir, dtype, DEVICE == "cuda", 8 if DEVICE == "cuda" else 1, kernels=kernels, overlap=True)
    try:
        r[f"engine_build_s_{suffix}"] = round(time.perf_counter() - t_build, 1)
        r[f"overlap_depth_{suffix}"] = eng.config.overlap_depth
        tm0 = eng.timings()
        runs = asyncio.run(_bs1_runs(eng, ids, n_tokens))
        r[f"timings_bs1_{suffix}"] = _tdiff(eng.timings(), tm0)
        r[f"batch1_tokens_per_s_{suffix}"] = _tokens_per_s(runs)
        r[f"t3_ttft_ms_bs1_{suffix}"] = statistics.median([f * 1000 for _, f, _ in runs])
        got = _greedy(eng, ids)
        r[f"greedy_{suffix}_equal_serial"] = got == serial_greedy
        r[f"greedy_{suffix}_vs_serial"] = _agreement(got, serial_greedy)  # where they part, if they do
        print(f"  {suffix} ({eng.kernels_status}, depth {eng.config.overlap_depth}) bs1 {r[f'batch1_tokens_per_s_{suffix}']:.0f} tok/s (serial "
              f"{r.get(serial_suffix) or 0:.0f}); split {r[f'timings_bs1_{suffix}']}; greedy equal serial: "
              f"{r[f'greedy_{suffix}_equal_serial']} {r[f'greedy_{suffix}_vs_serial']}", flush=True)
    finally:
        eng.close()
        del eng  # the caller's reference: only then can the collector free the engine's tensors
        release_memory()


@section("t3")
def t3(model_dir: Path, n_tokens: int, sweep: list[int], compile: bool = False, compile_mode: str = "default") -> None:
    from token_service.t3.sampling import SamplingParams

    peak_reset()
    t_build = time.perf_counter()
    kernels = "triton" if T3_KERNELS == "triton" else "torch"
    eng = _engine(model_dir, "bfloat16" if DEVICE == "cuda" else "float32", DEVICE == "cuda", max(sweep),
                  kernels=kernels)
    r: dict[str, Any] = {"engine_build_s": time.perf_counter() - t_build, "t3_kernels": eng.kernels_status,
                         "t3_overlap": T3_OVERLAP, "t3_overlap_depth": T3_OVERLAP_DEPTH}
    print(f"  engine built in {r['engine_build_s']:.1f}s", flush=True)
    # roofline: every decoded token reads all weights the decode step uses once (batch 1)
    r["decode_weight_bytes"] = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    bw = RESULTS.get("copy_bandwidth_GBps")
    if bw:
        r["roofline_tokens_per_s_bs1"] = bw * 1e9 / r["decode_weight_bytes"]
    ids = RESULTS.get("text_ids") or [eng.tokenize(t) for t in TEXTS]

    if DEVICE == "cuda":
        r["decode_graph_ms"] = {"1x512": _step_replay_ms(eng, eng.runner.groups[0], 1, 512),
                                "8x512": _step_replay_ms(eng, eng.runner.groups[0], 8, 512)}
        print(f"  graph replay ms/step: {r['decode_graph_ms']}", flush=True)
    tm0 = eng.timings()
    runs = asyncio.run(_bs1_runs(eng, ids, n_tokens))
    print(f"  bs1 runs (tokens, ttft, total): {runs}", flush=True)
    r["peak_gpu_mem_GB_conc1"] = peak_gb()
    r["timings_bs1"] = _tdiff(eng.timings(), tm0)
    print(f"  bs1 engine-thread split: {r['timings_bs1']}; peak {r['peak_gpu_mem_GB_conc1']:.2f} GB", flush=True)
    r["t3_tokens_per_s_bs1"] = _tokens_per_s(runs)
    r["t3_ttft_ms_bs1"] = statistics.median([f * 1000 for _, f, _ in runs])
    if compile:  # before the KV groups grow: the compiled engine needs its own first group
        try:
            t3_compiled(model_dir, n_tokens, eng, r, compile_mode)
        except Exception as e:  # noqa: BLE001 - record; the rest of the section still runs
            r["compile_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if T3_KERNELS == "both":  # also before the KV groups grow
        try:
            t3_triton(model_dir, n_tokens, eng, r)
        except Exception as e:  # noqa: BLE001 - record; the rest of the section still runs
            r["triton_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if T3_OVERLAP == "both":  # the same steps with overlap_steps on (still before the KV groups grow)
        variants = [(kernels, "overlap", "t3_tokens_per_s_bs1", "greedy_eager")]
        if T3_KERNELS == "both":
            variants.append(("triton", "triton_overlap", "batch1_tokens_per_s_triton", "greedy_tokens_triton"))
        for k, suffix, serial_key, greedy_key in variants:
            try:
                if greedy_key == "greedy_eager":
                    r.setdefault("greedy_eager", _greedy(eng, ids))
                if greedy_key not in r:
                    raise RuntimeError(f"no serial {k} greedy tokens to compare with (its variant failed)")
                t3_overlap(model_dir, n_tokens, ids, k, r, suffix, serial_key, r[greedy_key])
            except Exception as e:  # noqa: BLE001 - record; the rest of the section still runs
                r[f"{suffix}_error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()

    # KV groups beyond the first are created on first use (allocation + graph capture); create them
    # all now so the sweep times steady state, and report what growing costs.
    t_grow = time.perf_counter()
    for i in range(len(eng.runner.groups)):
        eng.runner.ensure_group(i)
    sync()
    r["kv_grow_all_s"] = time.perf_counter() - t_grow
    r["kv_groups"] = [g.size for g in eng.runner.groups]
    print(f"  grew KV groups {r['kv_groups']} in {r['kv_grow_all_s']:.1f}s", flush=True)
    if DEVICE == "cuda" and len(eng.runner.groups) > 1:
        # only a group created just now is idle: group 0's released rows keep their last positions
        # until the engine's next step resets them, and replaying over them writes past a 512 bucket
        last = eng.runner.groups[-1]
        r["decode_graph_ms"][f"{last.size}x512"] = _step_replay_ms(eng, last, last.size, 512)
        print(f"  graph replay ms/step: {r['decode_graph_ms']}", flush=True)

    async def batch(n: int):
        ps = [SamplingParams(max_new_tokens=n_tokens, seed=i) for i in range(n)]
        t0 = time.perf_counter()
        res = await asyncio.gather(*[_run_one(eng, ids[i % len(ids)], ps[i]) for i in range(n)])
        wall = time.perf_counter() - t0
        return sum(len(x[0]) for x in res) / wall, [x[1] for x in res]

    sweep_r = {}
    for n in sweep:
        tm0 = eng.timings()
        agg, ttfts = asyncio.run(batch(n))
        split = _tdiff(eng.timings(), tm0)
        print(f"  batch {n}: {agg:.0f} tok/s; ttft ms {sorted(round(t * 1000) for t in ttfts)[:: max(1, n // 8)]}; "
              f"split {split}", flush=True)
        sweep_r[n] = {"aggregate_tokens_per_s": agg, "ttft_p50_ms": pct(ttfts, 50) * 1000,
                      "ttft_p99_ms": pct(ttfts, 99) * 1000, "realtime_streams_equiv": agg / 25.0}
    r["batch_sweep"] = sweep_r
    r["peak_gpu_mem_GB"] = peak_gb()
    r["stats"] = eng.stats()
    eng.close()
    RESULTS["t3"] = r


@section("accuracy")
def accuracy(model_dir: Path) -> None:
    from token_service.t3.sampling import SamplingParams

    ref = RESULTS.get("upstream_greedy")
    ids = RESULTS.get("text_ids")
    if not ids:
        eng0 = _engine(model_dir, "float32", False, 1)
        ids = [eng0.tokenize(t) for t in TEXTS]
        eng0.close()
    r: dict[str, Any] = {}
    greedy_of: dict[str, list[list[int]]] = {}
    variants = [("float32", "torch"), ("bfloat16", "torch")]
    if T3_KERNELS != "torch":
        variants.append(("bfloat16", "triton"))
    for dtype, kernels in variants:
        if DEVICE != "cuda" and dtype != "float32":
            continue
        eng = _engine(model_dir, dtype, dtype != "float32", 8, kernels=kernels)
        tag = dtype if kernels == "torch" else f"{dtype}_{kernels}"
        if kernels != "torch":
            r[f"kernels_status_{tag}"] = eng.kernels_status

        async def greedy():
            return [
                (await _run_one(eng, i, SamplingParams(top_k=1, max_new_tokens=64, seed=0)))[0] for i in ids
            ]

        got = asyncio.run(greedy())
        eng.close()
        greedy_of[tag] = got
        if ref:
            r[f"greedy_vs_upstream_{tag}"] = _agreement(got, ref)
        # every half-precision variant vs our fp32 engine; the Triton step also vs the torch bf16 step
        for other in ("float32",) if kernels == "torch" else ("float32", "bfloat16"):
            if other in greedy_of and other != tag:
                r[f"greedy_{tag}_vs_ours_{other}"] = _agreement(got, greedy_of[other])
        del eng
        release_memory()
    RESULTS["accuracy"] = r


# --------------------------------------------------------------------------------------- s3gen
@section("s3gen")
@torch.inference_mode()
def s3gen(model_dir: Path) -> None:
    from vocoder_service.s3gen import StreamingSession
    from vocoder_service.s3gen.loading import load_vocoder

    peak_reset()
    model, voices = load_vocoder(model_dir, device=DEVICE)
    voice = voices["default"]
    r: dict[str, Any] = {}
    for n in (50, 150):
        tok = torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(n))
        r[f"s3gen_s_{n}tok_fp32"] = median_time(lambda: model.synthesize(tok, voice, seed=0))
    # streaming: time of each push, first chunk included
    tok = torch.randint(0, 6561, (250,), generator=torch.Generator().manual_seed(7)).tolist()
    firsts, per_chunk = [], []
    for rep in range(4):
        s = StreamingSession(model, voice, seed=rep)
        got_first = False
        for i in range(0, len(tok), 5):
            sync()
            t0 = time.perf_counter()
            a = s.push(tok[i:i + 5])
            sync()
            dt = time.perf_counter() - t0
            if a.numel():
                (per_chunk if got_first else firsts).append(dt * 1000)
                got_first = True
        s.finish()
        s.close()
    r["stream_first_chunk_ms"] = statistics.median(firsts[1:] or firsts)
    r["stream_chunk_ms_p50"] = pct(per_chunk, 50)
    r["peak_gpu_mem_GB"] = peak_gb()
    # half precision error vs fp32 (mel), same noise
    tok = torch.randint(0, 6561, (100,), generator=torch.Generator().manual_seed(3))
    mel32 = model.tokens_to_mel(tok, voice, seed=0).float()
    for dt in (torch.bfloat16, torch.float16):
        try:
            m = model.to(dt)
            mel = m.tokens_to_mel(tok, voice.to(dtype=dt), seed=0).float()
            r[f"mel_rel_err_{str(dt).split('.')[-1]}"] = float((mel - mel32).norm() / mel32.norm())
        except Exception as e:  # record: a dtype the modules do not support yet
            r[f"mel_rel_err_{str(dt).split('.')[-1]}"] = f"{type(e).__name__}: {e}"
        finally:
            model.float()
    RESULTS["s3gen"] = r
    del model
    release_memory()
    r["variants"] = s3gen_variants(model_dir, voice)


S3GEN_VARIANTS = {  # name -> (flow dtype, CUDA graphs)
    "fp32": ("float32", False), "bf16": ("bfloat16", False), "fp16": ("float16", False),
    "fp32_graphs": ("float32", True), "bf16_graphs": ("bfloat16", True), "fp16_graphs": ("float16", True),
    "tf32_graphs": ("float32", True),  # fp32 weights, TF32 matmuls / convs (torch.backends flags)
}
S3GEN_BUDGET_S = 360.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    n = min(a.numel(), b.numel())
    a, b = a.reshape(-1)[:n], b.reshape(-1)[:n]
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _stream_solo(model, voice, tok: list[int], seed: int) -> tuple[torch.Tensor, float | None, list[float]]:
    """Push one token at a time (every push that returns audio is one step) -> (audio, first ms, later ms)."""
    from vocoder_service.s3gen import StreamingSession

    s = StreamingSession(model, voice, seed=seed)
    first, later, outs = None, [], []
    for t in tok:
        sync()
        t0 = time.perf_counter()
        a = s.push([t])
        sync()
        dt = (time.perf_counter() - t0) * 1000
        if a.numel():
            if first is None:
                first = dt
            else:
                later.append(dt)
        outs.append(a)
    outs.append(s.finish())
    s.close()
    return torch.cat(outs), first, later


def _batched_throughput(model, voice, n_streams: int, n_tokens: int, per_push: int = 5) -> dict:
    """n_streams sessions fed ``per_push`` tokens each per ``push_batch`` call; audio s per wall s (pushes only)."""
    from vocoder_service.s3gen import StreamingSession
    from vocoder_service.s3gen.streaming import push_batch

    g = torch.Generator().manual_seed(n_streams)
    toks = torch.randint(0, 6561, (n_streams, n_tokens), generator=g).tolist()
    sessions = [StreamingSession(model, voice, seed=i) for i in range(n_streams)]
    samples, calls = 0, 0
    sync()
    t0 = time.perf_counter()
    for i in range(0, n_tokens, per_push):
        outs = push_batch(sessions, [t[i:i + per_push] for t in toks])
        samples += sum(o.numel() for o in outs)
        calls += 1
    sync()
    wall = time.perf_counter() - t0
    for s in sessions:
        s.close()
    audio_s = samples / 24000
    return {"streams": n_streams, "tokens_per_stream": n_tokens, "wall_s": wall, "audio_s": audio_s,
            "audio_s_per_s": audio_s / wall, "push_batch_calls": calls, "ms_per_call": 1000 * wall / calls}


def _profile_first_chunk(model, voice, tok: list[int]) -> list[dict]:
    """torch.profiler over the first streaming chunk (7 tokens); prints and returns the top-15 kernels."""
    from torch.profiler import ProfilerActivity, profile

    from vocoder_service.s3gen import StreamingSession

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    s = StreamingSession(model, voice, seed=99)
    with profile(activities=acts) as prof:
        s.push(tok[:7])
        sync()
    s.close()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        rows.append({"name": e.key, "self_device_us": float(dev_us), "self_cpu_us": float(e.self_cpu_time_total),
                     "calls": int(e.count)})
    key = "self_device_us" if DEVICE == "cuda" else "self_cpu_us"
    rows.sort(key=lambda x: -x[key])
    top = rows[:15]
    print(f"  top-15 ops by {key} (first chunk):", flush=True)
    for x in top:
        print(f"    {x[key] / 1000:8.3f} ms  x{x['calls']:<5d} {x['name'][:100]}", flush=True)
    total = sum(x[key] for x in rows)
    print(f"    total {key}: {total / 1000:.3f} ms", flush=True)
    return top


def s3gen_variants(model_dir: Path, voice) -> dict:
    """Every fast-path variant of ``prepare_s3gen`` (flow dtype x CUDA graphs) on the same inputs:
    offline time, streaming first-chunk / per-chunk latency, batched throughput, error vs fp32."""
    from vocoder_service.s3gen.accel import prepare_s3gen
    from vocoder_service.s3gen.loading import load_vocoder

    t_start = time.perf_counter()
    out: dict[str, Any] = {}
    tok_err = torch.randint(0, 6561, (100,), generator=torch.Generator().manual_seed(3))
    tok_stream = torch.randint(0, 6561, (150,), generator=torch.Generator().manual_seed(7)).tolist()
    ref: dict[str, torch.Tensor] = {}
    sizes = (8, 32, 64) if DEVICE == "cuda" else (8,)
    n_batch_tokens = 100 if DEVICE == "cuda" else 30
    for name, (dtype, graphs) in S3GEN_VARIANTS.items():
        r: dict[str, Any] = {"dtype": dtype, "cuda_graphs": graphs}
        out[name] = r
        if graphs and DEVICE != "cuda":
            r["skipped"] = "CUDA graphs need a CUDA device"
            continue
        if time.perf_counter() - t_start > S3GEN_BUDGET_S:
            r["skipped"] = f"s3gen variant budget ({S3GEN_BUDGET_S:.0f} s) spent"
            continue
        print(f"-- s3gen variant {name}", flush=True)
        t_var = time.perf_counter()
        model = None
        tf32 = name.startswith("tf32")
        prev_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            peak_reset()
            model, voices = load_vocoder(model_dir, device=DEVICE)
            v = voices["default"]
            prepare_s3gen(model, dtype=dtype, cuda_graphs=graphs)
            # accuracy first (reference = the fp32 variant, run first)
            mel = model.tokens_to_mel(tok_err, v, seed=0)
            wav = model.synthesize(tok_err, v, seed=0)
            if name == "fp32":
                ref["mel"], ref["wav"] = mel.cpu(), wav.cpu()
            if ref:
                r["mel_rel_err"] = _rel(mel, ref["mel"])
                r["wav_rel_err"] = _rel(wav, ref["wav"])
            # offline
            for n in (50, 150):
                tok = torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(n))
                r[f"offline_s_{n}tok"] = median_time(lambda: model.synthesize(tok, v, seed=0))
            # streaming, batch 1 (rep 0 warms up / captures the graphs)
            firsts, later = [], []
            for rep in range(3):
                audio, first, lat = _stream_solo(model, v, tok_stream, seed=5)
                if rep == 0:
                    if name == "fp32":
                        ref["stream"] = audio.cpu()
                    if ref.get("stream") is not None:
                        r["stream_wav_rel_err"] = _rel(audio, ref["stream"])
                    r["stream_first_chunk_ms_cold"] = first
                    continue
                if first is not None:
                    firsts.append(first)
                later += lat
            r["stream_first_chunk_ms"] = statistics.median(firsts) if firsts else None
            r["stream_chunk_ms_p50"] = pct(later, 50)
            r["stream_chunk_ms_p90"] = pct(later, 90)
            print(f"  first chunk {r['stream_first_chunk_ms']} ms, chunk p50 {r['stream_chunk_ms_p50']} ms, "
                  f"offline 50/150 {r['offline_s_50tok']:.4f}/{r['offline_s_150tok']:.4f} s, "
                  f"mel err {r.get('mel_rel_err')}, wav err {r.get('wav_rel_err')}", flush=True)
            try:
                r["profile_first_chunk_top15"] = _profile_first_chunk(model, v, tok_stream)
            except Exception as e:  # noqa: BLE001
                r["profile_error"] = f"{type(e).__name__}: {e}"
            # batched push_batch throughput (a warm-up pass of the same size first: graph capture)
            batched = {}
            for n in sizes:
                try:
                    _batched_throughput(model, v, n, n_batch_tokens)  # warm-up: every chunk shape once
                    batched[str(n)] = _batched_throughput(model, v, n, n_batch_tokens)
                    print(f"  push_batch x{n}: {batched[str(n)]['audio_s_per_s']:.1f} audio s/s, "
                          f"{batched[str(n)]['ms_per_call']:.1f} ms/call", flush=True)
                except Exception as e:  # noqa: BLE001
                    batched[str(n)] = {"error": f"{type(e).__name__}: {e}"}
                    traceback.print_exc()
                    if DEVICE == "cuda":
                        torch.cuda.empty_cache()
            r["batched"] = batched
            if graphs and getattr(model, "graphs", None) is not None:
                r["graph_stats"] = model.graphs.stats()
                print(f"  graphs: {r['graph_stats']}", flush=True)
            r["peak_gpu_mem_GB"] = peak_gb()
        except Exception as e:  # noqa: BLE001 - record and go on with the next variant
            r["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
            r["seconds"] = round(time.perf_counter() - t_var, 1)
            del model
            release_memory()
    return out


# ------------------------------------------------------------------------------------ report
def report(out: Path) -> str:
    u, t, s = RESULTS.get("upstream", {}), RESULTS.get("t3", {}), RESULTS.get("s3gen", {})

    def f(x, fmt="{:.1f}"):
        return fmt.format(x) if isinstance(x, (int, float)) else "–"

    def ratio(a, b):
        return f"{a / b:.1f}×" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "–"

    lines = [
        f"GPU: {RESULTS.get('gpu')} · torch {RESULTS.get('torch')} · copy bandwidth "
        f"{f(RESULTS.get('copy_bandwidth_GBps'), '{:.0f}')} GB/s",
        "",
        "| metric | upstream 0.1.7 (fp32 eager) | ours | ratio |",
        "| --- | --- | --- | --- |",
        f"| T3 speech tokens/s, batch 1 | {f(u.get('t3_tokens_per_s_bs1'))} | {f(t.get('t3_tokens_per_s_bs1'))} | "
        f"{ratio(t.get('t3_tokens_per_s_bs1'), u.get('t3_tokens_per_s_bs1'))} |",
        f"| T3 time to first token (ms) | – | {f(t.get('t3_ttft_ms_bs1'))} | |",
    ]
    def mean_agree(ag) -> float | None:  # greedy agreement over texts, weighted by tokens compared
        return sum(a["match_frac"] * a["compared"] for a in ag) / max(1, sum(a["compared"] for a in ag)) if ag else None

    def step_variant_rows(suffix: str, title: str, base: str, name: str, agree_what: str,
                          wider: tuple[str, ...] = ()) -> list[str]:
        """T3 rows of a decode-step variant (the ``*_<suffix>`` keys) against the ``base`` step; ``wider``:
        more graph shapes of the variant whose replay ms are listed too (e.g. "1x1024")."""
        gm, gv = t.get("decode_graph_ms", {}), t.get(f"decode_graph_ms_{suffix}", {})
        ag = t.get(f"greedy_{suffix}_vs_eager") or []
        more_title = f"; {name} {', '.join(wider)}" if wider else ""
        more_ms = "; " + ", ".join(f(gv.get(k), "{:.3f}") for k in wider) if wider else ""
        return [
            f"| T3 tokens/s, batch 1, {title} | | {f(t.get(f'batch1_tokens_per_s_{suffix}'))} | "
            f"{ratio(t.get(f'batch1_tokens_per_s_{suffix}'), t.get('t3_tokens_per_s_bs1'))} of {base}-step graphs |",
            f"| T3 decode graph replay ms/step 1x512, {base} → {name} (kernels/step){more_title} | | "
            f"{f(gm.get('1x512'), '{:.3f}')} → {f(gv.get('1x512'), '{:.3f}')} "
            f"({f(t.get('decode_kernels_per_step', {}).get('1x512'), '{:.0f}')} → "
            f"{f(t.get(f'decode_kernels_per_step_{suffix}', {}).get('1x512'), '{:.0f}')}){more_ms} | |",
            f"| T3 greedy agreement, {agree_what} (64 tokens × {len(ag)} texts) | | {f(mean_agree(ag), '{:.3f}')} | |",
        ]

    if "batch1_tokens_per_s_compiled" in t or "compile_status" in t:
        lines += step_variant_rows(
            "compiled", f"torch.compile ({t.get('compile_mode', 'default')}; {t.get('compile_status', '–')[:40]})",
            "eager", "compiled", "compiled vs eager step, same dtype")
    if "batch1_tokens_per_s_triton" in t or "kernels_status" in t:
        lines += step_variant_rows(
            "triton", f"Triton decode step ({t.get('kernels_status', '–')[:40]})", "torch", "Triton",
            "Triton vs torch step, bf16", wider=("1x1024", "8x512"))
    for suffix, serial_key, name in (("overlap", "t3_tokens_per_s_bs1", t.get("t3_kernels", "main")),
                                     ("triton_overlap", "batch1_tokens_per_s_triton", "triton")):
        if f"batch1_tokens_per_s_{suffix}" in t or f"{suffix}_error" in t:
            tm = t.get(f"timings_bs1_{suffix}", {})
            depth = t.get(f"overlap_depth_{suffix}", t.get("t3_overlap_depth", 1))
            lines.append(f"| T3 tokens/s, batch 1, {name[:40]} step: serial → overlapped steps, depth {depth} (greedy tokens equal; "
                         f"decode / emit ms per step) | | {f(t.get(serial_key))} → "
                         f"{f(t.get(f'batch1_tokens_per_s_{suffix}'))} ({t.get(f'greedy_{suffix}_equal_serial', '–')}; "
                         f"{f(tm.get('decode_ms_each'), '{:.3f}')} / {f(tm.get('emit_ms_each'), '{:.3f}')}) | "
                         f"{ratio(t.get(f'batch1_tokens_per_s_{suffix}'), t.get(serial_key))} |")
    acc = RESULTS.get("accuracy", {})
    if "greedy_bfloat16_triton_vs_ours_float32" in acc:
        lines.append(f"| T3 greedy agreement with our fp32 engine, bf16 torch step / bf16 Triton step | | "
                     f"{f(mean_agree(acc.get('greedy_bfloat16_vs_ours_float32')), '{:.3f}')} / "
                     f"{f(mean_agree(acc.get('greedy_bfloat16_triton_vs_ours_float32')), '{:.3f}')} | |")
    lines += [
        f"| T3 batch-1 roofline (weights {f(t.get('decode_weight_bytes', 0) / 1e9, '{:.2f}')} GB/token at the copy "
        f"bandwidth), tokens/s | | {f(t.get('roofline_tokens_per_s_bs1'), '{:.0f}')} | "
        f"ours at {ratio(t.get('t3_tokens_per_s_bs1'), t.get('roofline_tokens_per_s_bs1'))} of it |",
        f"| S3Gen 50 tokens (2 s audio), s | {f(u.get('s3gen_s_50tok'), '{:.3f}')} | "
        f"{f(s.get('s3gen_s_50tok_fp32'), '{:.3f}')} | {ratio(u.get('s3gen_s_50tok'), s.get('s3gen_s_50tok_fp32'))} |",
        f"| S3Gen 150 tokens (6 s audio), s | {f(u.get('s3gen_s_150tok'), '{:.3f}')} | "
        f"{f(s.get('s3gen_s_150tok_fp32'), '{:.3f}')} | {ratio(u.get('s3gen_s_150tok'), s.get('s3gen_s_150tok_fp32'))} |",
        f"| vocoder first streaming chunk (ms) | – | {f(s.get('stream_first_chunk_ms'))} | |",
        f"| peak GPU memory T3 / S3Gen (GB) | {f(u.get('peak_gpu_mem_GB'), '{:.2f}')} (both) | "
        f"{f(t.get('peak_gpu_mem_GB'), '{:.2f}')} / {f(s.get('peak_gpu_mem_GB'), '{:.2f}')} | |",
        f"| T3 peak GPU memory at concurrency 1 (GB; KV grows with load) | | "
        f"{f(t.get('peak_gpu_mem_GB_conc1'), '{:.2f}')} | |",
    ]
    var = s.get("variants", {})
    if var:
        lines += ["", "| S3Gen variant | offline 50 / 150 tok s | stream first chunk ms | chunk p50 ms | "
                  "push_batch audio s/s (8 / 32 / 64) | mel / wav / stream rel err vs fp32 | note |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, v in var.items():
            b = v.get("batched", {})
            thr = " / ".join(f(b.get(k, {}).get("audio_s_per_s"), "{:.0f}") for k in ("8", "32", "64"))
            err = " / ".join(f(v.get(k), "{:.1e}") for k in ("mel_rel_err", "wav_rel_err", "stream_wav_rel_err"))
            note = v.get("skipped") or v.get("error") or ""
            lines.append(f"| {name} | {f(v.get('offline_s_50tok'), '{:.3f}')} / {f(v.get('offline_s_150tok'), '{:.3f}')} | "
                         f"{f(v.get('stream_first_chunk_ms'))} | {f(v.get('stream_chunk_ms_p50'))} | {thr} | {err} | {note[:80]} |")
    sweep = t.get("batch_sweep", {})
    if sweep:
        lines += ["", "| concurrent T3 streams | aggregate tokens/s | real-time streams (25 tok/s) | TTFT p50 / p99 ms |",
                  "| --- | --- | --- | --- |"]
        for n, v in sweep.items():
            lines.append(f"| {n} | {v['aggregate_tokens_per_s']:.0f} | {v['realtime_streams_equiv']:.0f} | "
                         f"{v['ttft_p50_ms']:.0f} / {v['ttft_p99_ms']:.0f} |")
    for key, title in (("services", "Services"), ("services_mps", "Services under MPS"),
                       ("services_colocated", "Services co-located (one process)")):
        svc = RESULTS.get(key, {})
        if svc.get("skipped"):
            lines += ["", f"{title}: skipped ({svc['skipped']})"]
        if not svc.get("sweep"):
            continue
        lines += ["", f"{title}, concurrency 1: time to first audio p50 {f(svc.get('ttfa_c1_p50_ms'), '{:.0f}')} ms, "
                  f"p90 {f(svc.get('ttfa_c1_p90_ms'), '{:.0f}')} ms; real-time factor {f(svc.get('rtf'), '{:.3f}')}; "
                  f"GPU memory per service (MB) {svc.get('gpu_mem_MB_c1') or svc.get('gpu_mem_MB')}", "",
                  f"| {key}: concurrency | TTFA p50 / p99 ms | streams with an underrun | audio s per s | errors |",
                  "| --- | --- | --- | --- | --- |"]
        for n, v in svc.get("sweep", {}).items():
            lines.append(f"| {n} | {v['ttfa_p50_ms']:.0f} / {v['ttfa_p99_ms']:.0f} | {v.get('underrun_streams', v['underruns'])} | "
                         f"{v['audio_s_per_s']:.1f} | {v['errors']} |")
        lines += _engine_stats_table(svc.get("sweep", {}))
    vo = RESULTS.get("vocoder_only", {})
    if vo.get("modes"):
        from bench.vocoder_load import table as vocoder_table

        lines += ["", f"Vocoder service alone (bench/vocoder_load.py; flags {vo['config'].get('vocoder_flags')}):", "",
                  vocoder_table(vo["modes"])]
    if RESULTS["errors"]:
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in RESULTS["errors"].items())]
    md = "\n".join(lines)
    (out / "PERF.md").write_text(md + "\n")
    (out / "perf.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    return md


def _engine_stats_table(levels: dict) -> list[str]:
    """Services sweep: both engines' statistics per level (``engine_stats``, from the services' logs)."""
    rows = []
    for n, v in levels.items():
        es = v.get("engine_stats") or {}
        voc, tok = es.get("vocoder_service") or {}, es.get("token_service") or {}
        if not voc and not tok:
            continue

        def g(x, fmt="{:.1f}"):
            return fmt.format(x) if isinstance(x, (int, float)) else "–"

        vm, vw = voc.get("mean", {}), voc.get("window", {})
        rows.append(f"| {n} | {g(vm.get('push_rows'))} | {g(voc.get('per_s', {}).get('worker_steps'))} | "
                    f"{g(vm.get('step_ms'))} | {g(voc.get('busy_frac'), '{:.2f}')} | {g(vm.get('queue_wait_ms'))} / "
                    f"{g(vw.get('queue_wait_ms', {}).get('p99_max'))} | {g(vm.get('handoff_ms'), '{:.2f}')} | "
                    f"{g(tok.get('per_s', {}).get('steps'))} | {g(tok.get('per_s', {}).get('tokens'), '{:.0f}')} | "
                    f"{g(tok.get('decode_frac'), '{:.2f}')} | {g(voc.get('peak', {}).get('reserved_MB'), '{:.0f}')} / "
                    f"{g(tok.get('peak', {}).get('reserved_MB'), '{:.0f}')} |")
    if not rows:
        return []
    return ["", "| services: concurrency | vocoder rows / push step | vocoder steps/s | step ms (mean) | vocoder busy | "
            "queue wait ms mean / p99 | hand-off ms | T3 steps/s | T3 tokens/s | T3 decode busy | "
            "torch reserved MB vocoder / T3 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows]


def render(paths: list[str], out: Path) -> None:
    """Merge perf.json files of several device calls (later wins) and write PERF.md/perf.json."""
    for p in paths:
        d = json.loads(Path(p).read_text())
        errs = d.pop("errors", {})
        RESULTS.update(d)
        RESULTS["errors"].update(errs)
    out.mkdir(parents=True, exist_ok=True)
    print(report(out))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--render":
        render(sys.argv[2:-1], Path(sys.argv[-1]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench-out"))
    ap.add_argument("--work", default="/tmp/bench-work")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--sweep", default="1,8,32,64,128,256")
    ap.add_argument("--sections", default="upstream,t3,accuracy,s3gen,services")
    ap.add_argument("--vocoder-flags", default="--dtype float16 --cuda-graphs true",
                    help="services section on the GPU: the vocoder's engine settings (fastest accurate variant)")
    ap.add_argument("--token-flags", default="", help="services section: extra token-service flags "
                    "(e.g. \"--vocoder-min-tokens 8 --vocoder-max-wait-ms 4\")")
    ap.add_argument("--level-time-s", type=float, default=20.0, help="services sweep: seconds per level")
    ap.add_argument("--stats-log-s", type=float, default=1.0, help="services / vocoder_only: the services' "
                    "TTS_STATS_LOG_S; each level gets the engines' statistics from their logs (0: off)")
    ap.add_argument("--vocoder-only-sweep", default="", help="e.g. 1,8,32,64,128: before the services section, "
                    "start only the vocoder service and run these levels of synthetic Vocode streams (issue 6)")
    ap.add_argument("--vocoder-only-modes", default="burst,realtime,fast", help="vocoder_only: token pacing per "
                    "stream: burst (100 tok/s, like T3), realtime (25 tok/s), fast (unpaced) or a rate in tok/s")
    ap.add_argument("--stack-dump-s", type=float, default=120.0)
    ap.add_argument("--t3-compile", choices=("auto", "on", "off"), default="auto",
                    help="t3 section: also time the torch.compile'd decode step (auto: on for CUDA, off for the dry run)")
    ap.add_argument("--t3-compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"),
                    help="torch.compile mode of the compiled T3 decode step")
    ap.add_argument("--t3-kernels", choices=("torch", "triton", "both"), default="both",
                    help="t3/accuracy sections: decode step of the main engine (torch | triton), or both: torch "
                         "for the main engine plus a Triton engine timed beside it")
    ap.add_argument("--t3-overlap", choices=("off", "on", "both"), default="both",
                    help="t3 section: engines with EngineConfig.overlap_steps off, on, or both: the main engine "
                         "(and the Triton one with --t3-kernels both) serial, each timed again with overlap on")
    ap.add_argument("--t3-overlap-depth", type=int, default=1,
                    help="t3 section: EngineConfig.overlap_depth of the overlapped engines (decode steps queued "
                         "ahead of the one whose ids are read; 1 = step N+1, 2 = N+1 and N+2)")
    ap.add_argument("--mps", choices=("off", "on", "both"), default="off",
                    help="services: run both services as clients of a private NVIDIA MPS daemon (bench/mps.py; "
                         "results under services_mps), without it (services), or both one after the other")
    ap.add_argument("--mps-vocoder-sm-pct", type=int, default=0,
                    help="with --mps on/both: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for the vocoder only (the share of "
                         "SMs its kernels may use, leaving the rest to T3); 0 = no limit")
    ap.add_argument("--vocoder-env", action="append", default=[], metavar="NAME=VALUE",
                    help="services: extra environment for the vocoder process only (repeatable), e.g. "
                         "CUDA_MPS_CLIENT_PRIORITY=1 (MPS: its kernels below the token service's)")
    ap.add_argument("--colocate", choices=("off", "on", "both"), default="off",
                    help="services: both services in ONE process (python -m token_service serve-colocated, one CUDA "
                         "context; results['services_colocated'], its GPU memory is the one process's); both = the "
                         "two-process run and then the co-located one")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="tiny preset on CPU, upstream skipped: checks the script itself, times nothing real")
    args = ap.parse_args()
    global DEVICE, PRESET, T3_KERNELS, T3_OVERLAP, T3_OVERLAP_DEPTH
    T3_KERNELS, T3_OVERLAP = args.t3_kernels, args.t3_overlap
    if args.t3_overlap_depth < 1:
        ap.error(f"--t3-overlap-depth must be >= 1, got {args.t3_overlap_depth}")
    T3_OVERLAP_DEPTH = args.t3_overlap_depth
    if args.cpu_dry_run:
        DEVICE, PRESET = "cpu", "tiny"
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    want = set(args.sections.split(","))
    import faulthandler

    # a hang shows up as stack dumps in the log instead of silence
    faulthandler.dump_traceback_later(args.stack_dump_s, repeat=True, file=sys.stderr)
    model_dir = setup(work)
    if model_dir is None:
        print(report(out))
        return
    sweep = [int(x) for x in args.sweep.split(",")]
    if "upstream" in want and DEVICE == "cuda":
        upstream(model_dir, args.tokens)
    if "t3" in want:
        compile_t3 = args.t3_compile == "on" or (args.t3_compile == "auto" and DEVICE == "cuda")
        t3(model_dir, args.tokens, sweep, compile=compile_t3, compile_mode=args.t3_compile_mode)
    if "accuracy" in want:
        accuracy(model_dir)
    if "s3gen" in want:
        s3gen(model_dir)
    if args.vocoder_only_sweep:
        from bench.vocoder_load import vocoder_only_section

        section("vocoder_only")(vocoder_only_section)(
            model_dir, [int(x) for x in args.vocoder_only_sweep.split(",") if x], RESULTS,
            modes=[m for m in args.vocoder_only_modes.split(",") if m], log_dir=out / "vocoder-only-logs",
            vocoder_flags=args.vocoder_flags.split() if DEVICE == "cuda" else [],
            stats_log_s=args.stats_log_s or 1.0, level_time_s=args.level_time_s)
        report(out)  # perf.json / PERF.md so far, in case a later section runs past the call's limit
    if "services" in want:
        modes = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.mps] if DEVICE == "cuda" else ["off"]
        if args.colocate != "on":
            for mode in modes:
                services_run(model_dir, sweep, out, args, mps=mode == "on")
        if args.colocate != "off":
            services_run(model_dir, sweep, out, args, mps=False, colocate=True)
    print(report(out))


def services_run(model_dir: Path, sweep: list[int], out: Path, args: argparse.Namespace, mps: bool,
                 colocate: bool = False) -> None:
    """The services section, as clients of an MPS daemon (``results["services_mps"]``), both in one
    process (``services_colocated``; no MPS, no vocoder-only environment) or plain (``services``)."""
    from bench.service_load import services_section

    key = "services_colocated" if colocate else "services_mps" if mps else "services"
    kw = dict(level_time_s=args.level_time_s, log_dir=out / f"{key.replace('_', '-')}-logs",
              vocoder_flags=args.vocoder_flags.split() if DEVICE == "cuda" else [],
              token_flags=args.token_flags.split(), stats_log_s=args.stats_log_s, key=key,
              vocoder_env=dict(kv.split("=", 1) for kv in args.vocoder_env))
    if colocate:
        if kw.pop("vocoder_env"):
            print("services_colocated: --vocoder-env ignored (one process for both services)", flush=True)
        section(key)(services_section)(model_dir, sweep, RESULTS, colocate=True, **kw)
        report(out)
        return
    if not mps:
        section(key)(services_section)(model_dir, sweep, RESULTS, **kw)
        return
    from bench.mps import MpsUnavailable, mps_daemon, server_log

    def run_with_mps() -> None:
        try:
            with mps_daemon() as env:
                try:
                    pct = args.mps_vocoder_sm_pct
                    venv = {**kw.pop("vocoder_env"),
                            **({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(pct)} if pct else {})}
                    services_section(model_dir, sweep, RESULTS, env=env, vocoder_env=venv, **kw)
                finally:
                    RESULTS.setdefault(key, {})["mps_log_tail"] = server_log(env, 1500)
        except MpsUnavailable as e:
            RESULTS[key] = {"skipped": f"MPS unavailable: {e}"}
            print(f"services with MPS skipped: {e}", flush=True)

    section(key)(run_with_mps)()
    report(out)


if __name__ == "__main__":
    main()
