"""What adding a KV slot group costs at run time (GPU): allocation, Triton warm-up / check, graph capture.

    PYTHONPATH=/tmp/site:$PWD python3 bench/profile_kv_growth.py [--first-group 1] [--slots 8] [--max-seq-len 768]

With a small ``TTS_KV_FIRST_GROUP`` (the low-memory settings) the token engine adds slot groups
(``first, first, 2x, 4x, ...``) when load needs them, inside the request's prefill: new streams wait
for it (bench/NOTES.md run 59: 18 s of prefill time for 13 prefills at 8 streams with groups of 1).
This builds the engine as the service does (demo turbo checkpoint, bf16, CUDA graphs, Triton step)
and times ``ModelRunner.ensure_group`` for every group after the first, split into its parts by
wrapping them with synchronising timers: the KV allocation, ``warm_up_fused`` (Triton compile +
check against the torch step + the sampler check) and ``capture_graphs``. Then it adds the groups of
a SECOND engine in the same process, where Triton's kernels are already compiled (in memory), which
separates compile time from the rest. One JSON line per group, then a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--first-group", type=int, default=1)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=768)
    ap.add_argument("--max-new-tokens", type=int, default=200, help="per request (with --max-seq-len, as the bench's services)")
    ap.add_argument("--work", default="/tmp/bench-work")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="turbo", help="demo checkpoint preset (tiny: a CPU check of the script)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from export.demo_checkpoint import write_demo_checkpoint
    from token_service.engine import EngineConfig, LLMEngine
    from token_service.engine import model_runner as mr

    d = Path(args.work) / f"demo-{args.preset}"
    if not d.exists():
        write_demo_checkpoint(d, args.preset, seed=0)
    dev = torch.device(args.device)
    parts: dict[str, float] = {}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(name: str, fn):
        def run(*a, **k):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
        return run

    for name in ("warm_up_fused", "capture_graphs", "capture_prefill_graphs"):
        setattr(mr.ModelRunner, name, timed(name, getattr(mr.ModelRunner, name)))
    rows = []
    for engine_no in (1, 2):
        parts.clear()
        t0 = time.perf_counter()
        eng = LLMEngine(EngineConfig(model_dir=str(d), device=args.device, dtype="bfloat16" if dev.type == "cuda" else "float32",
                                     max_slots=args.slots, max_seq_len=args.max_seq_len, kv_first_group=args.first_group,
                                     default_max_new_tokens=args.max_new_tokens))
        rec = {"engine": engine_no, "event": "start-up", "s": round(time.perf_counter() - t0, 3),
               "parts_s": {k: round(v, 3) for k, v in parts.items()}, "kernels": getattr(eng, "kernels_status", None)}
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        runner = eng.runner
        for i in range(1, len(runner.groups)):
            parts.clear()
            sync()
            t0 = time.perf_counter()
            g = runner.ensure_group(i)
            sync()
            rec = {"engine": engine_no, "event": "group", "group": i, "slots": g.size,
                   "batch_buckets": list(g.batch_sizes), "graphs": len(g.graphs),
                   "s": round(time.perf_counter() - t0, 3), "parts_s": {k: round(v, 3) for k, v in parts.items()}}
            rows.append(rec)
            print(json.dumps(rec), flush=True)
        eng.close()
        del eng, runner
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    growth = {n: round(sum(r["s"] for r in rows if r["engine"] == n and r["event"] == "group"), 3) for n in (1, 2)}
    print(json.dumps({"summary": "seconds adding every group after the first", "first_engine": growth[1],
                      "second_engine_kernels_compiled": growth[2]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
