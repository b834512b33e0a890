"""Tune the Triton decode step's block sizes on the GPU: graph replay of the logits per variant.

    PYTHONPATH=/tmp/site:$PWD python3 bench/tune_triton_decode.py [--kv 512] [--json out.json]

Loads the demo Turbo checkpoint once (bf16, CUDA), then for each variant (a set of
``token_service.t3.triton_decode`` constants) and batch size captures ``FusedDecode.logits`` in a
CUDA graph and times 200 replays; the torch step (``decode_step``, cuBLAS/cuDNN) is timed at the
same batch sizes for comparison. Logits only: the engine's step adds the sampler (~0.2 ms at batch 1).
Each variant recompiles the kernels (~10 s). Prints one JSON line per measurement.
``--engine-step`` also times the engine's whole captured decode step (``ModelRunner`` graph: Triton
logits + sampler + state updates, rows at position ``kv - 1``) with the one-kernel Triton sampler doing
the state updates too (``sample_fused_step``), the one-kernel sampler + the torch state updates, the
torch processors + one-kernel draw, and the torch sampler (``t3.triton_sampling``), at the batch sizes
the Triton step serves (records' ``"draw"``: fused-step | fused | race | torch).
``--step-variants JSON`` (with ``--engine-step``) also times the default step (``fused-step``) once per
set of step switches, each applied before its own ``ModelRunner`` is built, e.g.
``'[{"FUSE_EMBED": 0, "SAMPLER_PDL": 0}, {"FUSE_EMBED": 1, "SAMPLER_PDL": 0}, {"FUSE_EMBED": 0,
"SAMPLER_PDL": 1}, {"FUSE_EMBED": 1, "SAMPLER_PDL": 1}]'`` (``triton_decode.FUSE_EMBED``: the embedding in
the first GEMV; ``triton_sampling.SAMPLER_PDL``: the sampler kernel launched with PDL); one record each
(``"step_variant"``, and ``"sampler_pdl"``: whether the sampler really launched with PDL).

Programmatic dependent launch (``PDL``, ``PDL_TRIGGER``, ``GEMV_PREFETCH``; sm_90+) side by side:
``--pdl`` times :data:`PDL_VARIANTS` (off / on with each trigger placement / prefetch on-off) at
every batch size, in one process (each record says whether PDL was really on: ``"pdl"``).
``--variants JSON`` times any list of constant sets instead, e.g. ``'[{"PDL": 0}, {"PDL": 1,
"PDL_TRIGGER": "start"}]'``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.replay_timing import graph_replay_ms  # noqa: E402 - after the repo root is on the path

VARIANTS: list[dict[str, int | str]] = [
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
# programmatic dependent launch (--pdl): the pre-PDL kernels first, then PDL with each trigger placement
PDL_VARIANTS: list[dict[str, int | str]] = [
    {"PDL": 0, "GEMV_PREFETCH": 0},  # the kernels as before PDL
    {"PDL": 0, "GEMV_PREFETCH": 1},  # software-pipelined weight loop only
    {"PDL": 1, "PDL_TRIGGER": "end", "GEMV_PREFETCH": 1},  # the module defaults
    {"PDL": 1, "PDL_TRIGGER": "start", "GEMV_PREFETCH": 1},
    {"PDL": 1, "PDL_TRIGGER": "none", "GEMV_PREFETCH": 1},
    {"PDL": 1, "PDL_TRIGGER": "end", "GEMV_PREFETCH": 0},
    # the prefetched tile costs registers (ptxas, sm_90, no spills: B = 1 c_attn GEMV 64 -> 73 per thread,
    # merge GEMV 159 -> 167, B = 2 merge 128 -> 169):
    # half the tile keeps more programs per SM
    {"PDL": 1, "PDL_TRIGGER": "end", "GEMV_PREFETCH": 1, "TILE_ELEMS": 4096},
]
TUNABLES = ("TILE_ELEMS", "GEMV_WARPS", "MIN_PROGRAMS", "MAX_BLOCK_N", "KV_SPLITS", "MERGE_MIN_PROGRAMS", "BLOCK_L",
            "ATTN_WARPS", "ATTN_BALANCED", "ATTN_SMALL_BLOCK", "PDL", "PDL_TRIGGER", "GEMV_PREFETCH", "FUSE_EMBED")
# --step-variants: module switches of the engine's step, by module (applied before building the runner)
STEP_SWITCHES = {"FUSE_EMBED": "token_service.t3.triton_decode", "SAMPLER_PDL": "token_service.t3.triton_sampling"}


def captured_ms(fn, reps: int = 200, result: list | None = None) -> float:
    """Capture ``fn`` in a CUDA graph (after 3 warm-up calls) and time ``reps`` replays; ``result``
    gets the graph's output tensor (its value after the last replay) appended."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    ms = graph_replay_ms(g, reps, warmup=5)
    if result is not None:
        torch.cuda.synchronize()
        result.append(out)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", type=int, default=512)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--work", default="/tmp/bench-work")
    ap.add_argument("--json", default=None)
    ap.add_argument("--engine-step", action="store_true", help="also time ModelRunner's captured step")
    ap.add_argument("--defaults-only", action="store_true", help="time only the current constants (no variants)")
    ap.add_argument("--pdl", action="store_true",
                    help="time PDL_VARIANTS (PDL on/off, trigger, prefetch) at every batch")
    ap.add_argument("--variants", default=None, help="JSON list of constant sets to time at every batch")
    ap.add_argument("--step-variants", default=None,
                    help='with --engine-step: JSON list of {"FUSE_EMBED": 0/1, "SAMPLER_PDL": 0/1}, one record each')
    args = ap.parse_args()
    step_variants = json.loads(args.step_variants) if args.step_variants else []
    for v in step_variants:
        unknown = set(v) - set(STEP_SWITCHES)
        if unknown:
            raise SystemExit(f"unknown step switches {sorted(unknown)}; known: {', '.join(STEP_SWITCHES)}")
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
    defaults = {k: getattr(td, k) for k in TUNABLES}
    variants, all_batches = VARIANTS, False  # the block-size sweep: variants at the first batch size only
    if args.defaults_only:
        variants = [{}]
    elif args.pdl or args.variants:
        variants, all_batches = PDL_VARIANTS if args.pdl else json.loads(args.variants), True
        for v in variants:
            unknown = set(v) - set(TUNABLES)
            if unknown:
                raise SystemExit(f"unknown triton_decode constants {sorted(unknown)}; tunable: {', '.join(TUNABLES)}")
    print(f"FusedDecode.pdl (device supports PDL): {fd.pdl}", flush=True)
    rows = []

    def emit(rec: dict) -> None:
        rows.append(rec)
        print(json.dumps(rec), flush=True)

    with torch.inference_mode():
        for b in batches:
            emit({"path": "torch", "batch": b, "kv": args.kv,
                  "ms": round(captured_ms(lambda: decode_step(model, cache, b, tokens[:b], positions[:b], args.kv)), 4)})
        # reference logits per batch: the eager step without PDL (the variants' graph outputs must match it)
        td.PDL = False
        ref = {b: fd.logits(cache, b, tokens[:b], positions[:b]).clone() for b in batches}
        td.PDL = defaults["PDL"]
        for variant in variants:
            for k, v in defaults.items():
                setattr(td, k, v)
            for k, v in variant.items():
                setattr(td, k, v)
            for b in batches if not variant or all_batches else batches[:1]:
                try:
                    got: list = []
                    ms = captured_ms(lambda: fd.logits(cache, b, tokens[:b], positions[:b]), result=got)
                    # PDL / prefetch variants do the same arithmetic: 0 expected (a race would show here);
                    # block-size variants differ by rounding only
                    diff = float((got[0] - ref[b]).abs().max())
                    emit({"path": "triton", "variant": variant, "pdl": fd.pdl_active, "batch": b, "kv": args.kv,
                          "ms": round(ms, 4), "max_abs_diff_vs_no_pdl": diff})
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
                    emit({"path": "triton", "variant": variant, "batch": b, "error": f"{type(e).__name__}: {e}"[:300]})
        for k, v in defaults.items():
            setattr(td, k, v)
    if args.engine_step:
        for rec in engine_step_ms(model, dev, args.kv, [b for b in batches if b <= 2]):
            emit(rec)
        for v in step_variants:
            for rec in step_variant_ms(model, dev, args.kv, [b for b in batches if b <= 2], v):
                emit(rec)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def engine_step_ms(model, dev: torch.device, kv: int, batches: list[int]) -> list[dict]:
    """Replay time of ``ModelRunner``'s decode graph per batch bucket with each sampler: ``fused-step`` (the
    one-kernel sampler doing the step's state updates too, ``sample_fused_step``: the runner's default),
    ``fused`` (``sample_fused`` + 5 torch ops for the state), ``race`` (torch processors + the one-kernel
    draw), ``torch``."""
    from token_service.engine.model_runner import ModelRunner, RunnerShape

    r = ModelRunner(model, RunnerShape(max(batches), 1024, tuple(batches), 256, cuda_graphs=True,
                                       staged_prefill=False, kernels="triton"), dev, torch.bfloat16)
    if r.fused is None:
        return [{"path": "engine-step", "error": r.kernels_status}]
    g, out = r.groups[0], []
    for draw in ("fused-step", "fused", "race", "torch"):
        if draw != "fused-step":
            r.fused_sampler_step = None
            if draw != "fused":
                r.fused_sampler = None
            if draw == "torch":
                r.fused_draw = None
            g.graphs.clear()
            r.capture_graphs(g)
        used = ("fused-step" if r.fused_sampler_step is not None else "fused") if r.fused_sampler is not None \
            else "race" if r.fused_draw is not None else "torch"
        for b in batches:
            r.positions[:b] = kv - 1  # active stays 0: positions do not move between replays
            ms = graph_replay_ms(g.graphs[(b, r.shape.max_seq_len)], 200, warmup=5)
            out.append({"path": "engine-step", "draw": used, "kernels": r.kernels_status, "batch": b, "kv": kv,
                        "ms": round(ms, 4)})
    return out


def step_variant_ms(model, dev: torch.device, kv: int, batches: list[int], variant: dict[str, int]) -> list[dict]:
    """Replay time of ``ModelRunner``'s default decode graph (``fused-step``) per batch bucket with the step
    switches ``variant`` (:data:`STEP_SWITCHES`) set before the runner is built; restored after."""
    import importlib

    from token_service.engine.model_runner import ModelRunner, RunnerShape
    from token_service.t3 import triton_sampling as ts

    saved = {k: getattr(importlib.import_module(m), k) for k, m in STEP_SWITCHES.items()}
    out = []
    try:
        for k, v in variant.items():
            setattr(importlib.import_module(STEP_SWITCHES[k]), k, bool(v))
        r = ModelRunner(model, RunnerShape(max(batches), 1024, tuple(batches), 256, cuda_graphs=True,
                                           staged_prefill=False, kernels="triton"), dev, torch.bfloat16)
        if r.fused is None:
            return [{"path": "engine-step", "step_variant": variant, "error": r.kernels_status}]
        g = r.groups[0]
        used = ("fused-step" if r.fused_sampler_step is not None else "fused") if r.fused_sampler is not None \
            else "race" if r.fused_draw is not None else "torch"
        for b in batches:
            r.positions[:b] = kv - 1  # active stays 0: positions do not move between replays
            ms = graph_replay_ms(g.graphs[(b, r.shape.max_seq_len)], 200, warmup=5)
            out.append({"path": "engine-step", "step_variant": variant, "draw": used, "kernels": r.kernels_status,
                        "sampler_pdl": used == "fused-step" and ts.sampler_pdl(r.fused.pdl_active, dev),
                        "batch": b, "kv": kv, "ms": round(ms, 4)})
        del r
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - a variant that fails is a result too
        out.append({"path": "engine-step", "step_variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})
    finally:
        for k, v in saved.items():
            setattr(importlib.import_module(STEP_SWITCHES[k]), k, v)
    return out


if __name__ == "__main__":
    main()
