"""Where a batch-1 T3 token goes between graph replays: GPU busy vs idle, host time per engine step.

    PYTHONPATH=/tmp/site:$PWD python3 bench/profile_engine_steps.py [--tokens 300] [--overlap on|off|both]

Builds the engine as the bench's t3 section does (bf16, CUDA graphs, Triton step), runs one warm-up
generation, then one ``--tokens`` generation at batch 1 under ``torch.profiler`` (CPU + CUDA). From the
trace: the span from the first to the last GPU activity of the decode phase, the GPU busy time (union
of kernel and memcpy intervals), and the idle gaps between consecutive activities (count, total, the
largest); plus the engine thread's own split (``engine.timings()``). If the GPU is idle for a good part
of the span, the step is host-bound (launching late); if it is busy, only the kernels can make it faster.
Writes ``--json`` (default ``$OUT/engine_steps.json``) and prints one JSON line per variant.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gpu_intervals(prof) -> list[tuple[float, float]]:
    """(start, end) in µs of every device activity (kernels, memcpy, memset) in the trace, sorted."""
    out = []
    for ev in prof.events():
        dev = getattr(ev, "device_type", None)
        if dev is not None and str(dev).endswith("CUDA") and ev.time_range.end > ev.time_range.start:
            out.append((float(ev.time_range.start), float(ev.time_range.end)))
    return sorted(out)


def busy_and_gaps(iv: list[tuple[float, float]], gap_us: float = 3.0) -> dict:
    """Union of intervals (busy), the span, and the idle gaps longer than ``gap_us``."""
    if not iv:
        return {}
    busy, gaps = 0.0, []
    cur_s, cur_e = iv[0]
    for s, e in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e > gap_us:
                gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = iv[-1][1] - iv[0][0]
    gaps.sort()
    return {"span_ms": round(span / 1000, 3), "busy_ms": round(busy / 1000, 3), "busy_frac": round(busy / span, 4),
            "gaps_over_%gus" % gap_us: len(gaps), "gap_total_ms": round(sum(gaps) / 1000, 3),
            "gap_p50_us": round(gaps[len(gaps) // 2], 1) if gaps else 0.0,
            "gap_max_us": round(gaps[-1], 1) if gaps else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--overlap", choices=("on", "off", "both"), default="both")
    ap.add_argument("--work", default="/tmp/bench-work")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "engine_steps.json"))
    args = ap.parse_args()

    from bench.gpu_bench import TEXTS, setup
    from token_service.engine.llm_engine import EngineConfig, LLMEngine
    from token_service.t3.sampling import SamplingParams

    model_dir = setup(Path(args.work))
    results = []
    for overlap in ([False, True] if args.overlap == "both" else [args.overlap == "on"]):
        eng = LLMEngine(EngineConfig(model_dir=model_dir, device="cuda", dtype="bfloat16", cuda_graphs=True,
                                     max_slots=8, max_seq_len=2048, kernels="triton", overlap_steps=overlap))
        try:
            ids = eng.tokenize(TEXTS[0])

            async def run(n: int) -> tuple[int, float, float]:
                t0, first, count = time.perf_counter(), None, 0
                async for chunk in eng.generate("default", ids, SamplingParams(max_new_tokens=n, seed=1)):
                    first = first or time.perf_counter() - t0
                    count += len(chunk)
                return count, first, time.perf_counter() - t0

            asyncio.run(run(args.tokens))  # warm-up
            tm0 = eng.timings()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                n, first, total = asyncio.run(run(args.tokens))
            tm1 = eng.timings()
            iv = gpu_intervals(prof)
            # the decode phase: drop the prefill's activities (everything before the first token)
            rec = {"overlap": overlap, "kernels": eng.kernels_status, "tokens": n,
                   "tokens_per_s_after_first": round((n - 1) / (total - first), 1),
                   "engine": {k: round(tm1[k] - tm0.get(k, 0), 4) for k in tm1 if k != "kv_gb"},
                   "gpu": busy_and_gaps(iv), "gpu_activities": len(iv)}
            d = rec["engine"]
            if d.get("decodes"):
                rec["engine"]["decode_ms_each"] = round(1000 * d["decode_s"] / d["decodes"], 3)
            per_step = rec["gpu"].get("span_ms", 0) / max(n, 1)
            rec["gpu"]["span_ms_per_token"] = round(per_step, 4)
            rec["gpu"]["busy_ms_per_token"] = round(rec["gpu"].get("busy_ms", 0) / max(n, 1), 4)
            results.append(rec)
            print(json.dumps(rec), flush=True)
        finally:
            eng.close()
            del eng
            torch.cuda.empty_cache()
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
