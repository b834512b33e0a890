"""Profile one T3 decode step on the GPU (uncaptured, same shapes as a captured step): kernels by CUDA time.

    PYTHONPATH=/tmp/site:$PWD python3 bench/profile_decode.py [--batch 1] [--kv 512] [--compile] \
        [--t3-kernels torch|triton]

``--compile``: the torch.compile'd decode step (``EngineConfig.compile``), compiled at engine start.
``--t3-kernels triton``: the hand-written Triton step (``EngineConfig.kernels``; one graph per batch
size, each row attending up to its position: the rows are set to position ``kv - 1``, so both paths
attend to ``kv`` positions). ``--triton-set NAME=VALUE`` (repeatable) overrides a block-size constant
of ``token_service.t3.triton_decode`` first (``TILE_ELEMS``, ``MIN_PROGRAMS``, ``MERGE_MIN_PROGRAMS``,
``MAX_BLOCK_N``, ``KV_SPLITS``, ``BLOCK_L``, ``GEMV_WARPS``, ``ATTN_WARPS``; programmatic dependent
launch: ``PDL=0|1``, ``PDL_TRIGGER=end|start|none``, ``GEMV_PREFETCH=0|1``), to tune them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kv", type=int, default=512)
    ap.add_argument("--work", default="/tmp/bench-work")
    ap.add_argument("--compile", action="store_true", help="torch.compile'd decode step (EngineConfig.compile)")
    ap.add_argument("--t3-kernels", default="torch", choices=("torch", "triton"), help="EngineConfig.kernels")
    ap.add_argument("--triton-set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a t3.triton_decode constant (int, or str for PDL_TRIGGER)")
    args = ap.parse_args()
    if args.triton_set:
        from token_service.t3 import triton_decode as td

        for item in args.triton_set:
            name, value = item.split("=", 1)
            current = getattr(td, name, None)
            if not name.isupper() or not isinstance(current, (int, str)):
                raise SystemExit(f"--triton-set: {name!r} is not an int or str constant of t3.triton_decode")
            setattr(td, name, value if isinstance(current, str) else int(value))
            print(f"triton_decode.{name} = {value}")
    from bench.replay_timing import graph_replay_ms
    from export.demo_checkpoint import write_demo_checkpoint
    from token_service.engine.llm_engine import EngineConfig, LLMEngine

    d = Path(args.work) / "demo-turbo"
    if not d.exists():
        write_demo_checkpoint(d, "turbo", seed=0)
    eng = LLMEngine(EngineConfig(model_dir=d, cuda_graphs=True, max_slots=8, graph_batch_sizes=(1, 8),
                                 compile=args.compile, kernels=args.t3_kernels))
    print(f"compile: {eng.compile_status}; kernels: {eng.kernels_status}")
    r, g = eng.runner, eng.runner.groups[0]
    key = r.decode_key(args.batch, args.kv - 1, g)  # (batch, kv) for torch; (batch, max_seq_len) for triton
    with torch.inference_mode():
        r.positions[g.start:g.start + args.batch] = args.kv - 1  # idle rows (active 0): positions stay
        for _ in range(3):
            r._decode_body(g, args.batch, args.kv)
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                r._decode_body(g, args.batch, args.kv)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    n_kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 5
    print(f"CUDA kernels per step: {n_kernels:.0f}")
    print(f"graph replay: {graph_replay_ms(g.graphs[key], 200, warmup=3):.3f} ms/step")
    # new-shape cost of the eager in-place prefill (the path every prefill took before the staged
    # graphs): default SDPA backends (cuDNN on H100) vs cuDNN excluded
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from token_service.engine.model_runner import ModelRunner, RunnerShape
    from token_service.engine.sequence import Sequence
    from token_service.t3.sampling import SamplingParams

    plain = ModelRunner(eng.model, RunnerShape(8, 2048, (1, 8), 256, False, 8, staged_prefill=False), r.device, r.dtype)
    prefix = eng.prefixes["default"]

    def prefill_ms(T: int) -> float:
        seq = Sequence(voice="default", text_ids=list(range(100, 100 + T)), params=SamplingParams(seed=0), seed=0)
        seq.slot = 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        plain.prefill(seq, prefix)
        torch.cuda.synchronize()
        return round((time.perf_counter() - t0) * 1000, 1)

    with torch.inference_mode():
        print("eager prefill ms, default SDPA backends, T=10,11,12,37,10,11:",
              [prefill_ms(T) for T in (10, 11, 12, 37, 10, 11)])
        no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(no_cudnn):
            print("eager prefill ms, cuDNN excluded, T=13,14,15,38,13,14:",
                  [prefill_ms(T) for T in (13, 14, 15, 38, 13, 14)])
            cg = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                r._decode_body(g, args.batch, args.kv)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(cg, pool=r._pool):
                r._decode_body(g, args.batch, args.kv)
        print(f"graph replay, cuDNN SDPA excluded: {graph_replay_ms(cg, 200, warmup=0):.3f} ms/step")
    eng.close()


if __name__ == "__main__":
    main()
