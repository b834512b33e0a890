"""Tune the Triton decode step's block sizes on the GPU: graph replay of the logits per variant.

    PYTHONPATH=/tmp/site:$PWD python3 bench/tune_triton_decode.py [--kv 512] [--json out.json]

Loads the demo Turbo checkpoint once (bf16, CUDA), then for each variant (a set of
``token_service.t3.triton_decode`` constants) and batch size captures ``FusedDecode.logits`` in a
CUDA graph and times 200 replays; the torch step (``decode_step``, cuBLAS/cuDNN) is timed at the
same batch sizes for comparison. Logits only: the engine's step adds the sampler (~0.2 ms at batch 1).
Each variant recompiles the kernels (~10 s). Prints one JSON line per measurement.
``--engine-step`` also times the engine's whole captured decode step (``ModelRunner`` graph: Triton
logits + top-k sampler + state updates, rows at position ``kv - 1``) with the one-kernel Triton draw
(``t3.triton_sampling``) and with the torch draw, at the batch sizes the Triton step serves.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.replay_timing import graph_replay_ms  # noqa: E402 - after the repo root is on the path

VARIANTS: list[dict[str, int]] = [
    {},
    {"TILE_ELEMS": 8192},
    {"TILE_ELEMS": 16384},
    {"TILE_ELEMS": 8192, "GEMV_WARPS": 8},
    {"MIN_PROGRAMS": 132},
    {"MIN_PROGRAMS": 528},
    {"MAX_BLOCK_N": 32, "MIN_PROGRAMS": 132, "TILE_ELEMS": 8192},
    {"KV_SPLITS": 4},
    {"KV_SPLITS": 16},
]


def captured_ms(fn, reps: int = 200) -> float:
    """Capture ``fn`` in a CUDA graph (after 3 warm-up calls) and time ``reps`` replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return graph_replay_ms(g, reps, warmup=5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", type=int, default=512)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--work", default="/tmp/bench-work")
    ap.add_argument("--json", default=None)
    ap.add_argument("--engine-step", action="store_true", help="also time ModelRunner's captured step")
    ap.add_argument("--defaults-only", action="store_true", help="time only the current constants (no variants)")
    args = ap.parse_args()
    from export.demo_checkpoint import write_demo_checkpoint
    from token_service.t3 import triton_decode as td
    from token_service.t3.generate import decode_step
    from token_service.t3.loader import load_t3
    from token_service.t3.model import KVCache

    d = Path(args.work) / "demo-turbo"
    if not d.exists():
        write_demo_checkpoint(d, "turbo", seed=0)
    dev = torch.device("cuda")
    model = load_t3(d).drop_unused().to(dev, torch.bfloat16).eval()
    batches = [int(b) for b in args.batches.split(",")]
    cache = KVCache(model.cfg, max(batches), 1024, device=dev, dtype=torch.bfloat16)
    for t in cache.k + cache.v:
        t.normal_()
    tokens = torch.randint(0, 6561, (max(batches),), device=dev)
    positions = torch.full((max(batches),), args.kv - 1, dtype=torch.long, device=dev)
    fd = td.FusedDecode(model)  # re-lays the weights out once; the torch step reads the views
    defaults = {k: getattr(td, k) for k in ("TILE_ELEMS", "GEMV_WARPS", "MIN_PROGRAMS", "MAX_BLOCK_N", "KV_SPLITS",
                                            "MERGE_MIN_PROGRAMS", "BLOCK_L", "ATTN_WARPS")}
    rows = []

    def emit(rec: dict) -> None:
        rows.append(rec)
        print(json.dumps(rec), flush=True)

    with torch.inference_mode():
        for b in batches:
            emit({"path": "torch", "batch": b, "kv": args.kv,
                  "ms": round(captured_ms(lambda: decode_step(model, cache, b, tokens[:b], positions[:b], args.kv)), 4)})
        for variant in [{}] if args.defaults_only else VARIANTS:
            for k, v in defaults.items():
                setattr(td, k, v)
            for k, v in variant.items():
                setattr(td, k, v)
            for b in batches if not variant else batches[:1]:
                try:
                    ms = captured_ms(lambda: fd.logits(cache, b, tokens[:b], positions[:b]))
                    emit({"path": "triton", "variant": variant, "batch": b, "kv": args.kv, "ms": round(ms, 4)})
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
                    emit({"path": "triton", "variant": variant, "batch": b, "error": f"{type(e).__name__}: {e}"[:300]})
        for k, v in defaults.items():
            setattr(td, k, v)
    if args.engine_step:
        for rec in engine_step_ms(model, dev, args.kv, [b for b in batches if b <= 2]):
            emit(rec)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def engine_step_ms(model, dev: torch.device, kv: int, batches: list[int]) -> list[dict]:
    """Replay time of ``ModelRunner``'s decode graph per batch bucket, Triton draw on, then off."""
    from token_service.engine.model_runner import ModelRunner, RunnerShape

    r = ModelRunner(model, RunnerShape(max(batches), 1024, tuple(batches), 256, cuda_graphs=True,
                                       staged_prefill=False, kernels="triton"), dev, torch.bfloat16)
    if r.fused is None:
        return [{"path": "engine-step", "error": r.kernels_status}]
    g, out = r.groups[0], []
    for draw in ("triton", "torch"):
        if draw == "torch":
            r.fused_draw = None
            g.graphs.clear()
            r.capture_graphs(g)
        for b in batches:
            r.positions[:b] = kv - 1  # active stays 0: positions do not move between replays
            ms = graph_replay_ms(g.graphs[(b, r.shape.max_seq_len)], 200, warmup=5)
            out.append({"path": "engine-step", "draw": "triton" if r.fused_draw is not None else "torch",
                        "kernels": r.kernels_status, "batch": b, "kv": kv, "ms": round(ms, 4)})
    return out


if __name__ == "__main__":
    main()
