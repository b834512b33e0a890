"""What a CUDA process costs in GPU memory before any model: context, cuBLAS, cuDNN, Triton, NCCL-free.

    PYTHONPATH=/tmp/site:$PWD python3 bench/memory_breakdown.py [--json out.json]

Runs each stage in this one process and reads the process's GPU memory from ``nvidia-smi`` (what
the services benchmark reports per service) next to torch's ``memory_reserved`` after it:

1. ``torch.cuda.init()`` + a 1-element tensor (the CUDA context, torch's kernels loaded lazily);
2. a bf16 and an fp32 matmul (cuBLAS / cuBLASLt handles and workspaces);
3. an fp16 ``conv1d`` and ``conv_transpose1d`` (cuDNN, as the vocoder runs them);
4. a Triton kernel launch (Triton's runtime and module);
5. ``torch.stft`` / ``istft`` (cuFFT plans, as HiFT uses);
6. a CUDA graph capture + replay of the matmul.

``--stack-bytes N`` sets the context's per-thread stack limit (``cuCtxSetLimit(CU_LIMIT_STACK_SIZE)``,
driver API via ctypes) right after stage 1 and reports a stage ``stack_limit`` with the limits read
back: the driver reserves local memory for the stack of every thread the GPU can hold at once
(SMs x threads per SM x stack bytes), so the default 1 KB is ~270 MB on an H100.

The differences show how much of a service's ``nvidia-smi`` figure is outside the caching allocator
(issue 6: the ≤ 3 GB target at concurrency 1). One JSON line per stage.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from tts_common.gpu_memory import cuda_limits, limit_cuda_stack


def smi_mb() -> float | None:
    """This process's GPU memory in MB as nvidia-smi reports it (None if it does not list us)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()):
            return float(parts[1])
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--stack-bytes", type=int, default=None, help="set the per-thread stack limit after the context")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []

    def stage(name: str) -> None:
        torch.cuda.synchronize()
        rec = {"stage": name, "nvidia_smi_MB": smi_mb(),
               "torch_reserved_MB": round(torch.cuda.memory_reserved() / 2**20, 1)}
        if rec["nvidia_smi_MB"] is not None:
            rec["outside_allocator_MB"] = round(rec["nvidia_smi_MB"] - rec["torch_reserved_MB"], 1)
        rows.append(rec)
        print(json.dumps(rec), flush=True)

    torch.cuda.init()
    x = torch.zeros(1, device=dev)
    stage("context")
    if args.stack_bytes is not None:
        print(json.dumps({"limits_before": cuda_limits()}), flush=True)
        limit_cuda_stack(args.stack_bytes, "cuda")
        limits = cuda_limits()
        stage("stack_limit")
        rows[-1]["limits"] = limits
        print(json.dumps({"limits_after": limits}), flush=True)
    a = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)
    (a @ a).sum().item()
    a32 = a.float()
    (a32 @ a32).sum().item()
    stage("cublas")
    s = torch.randn(8, 512, 600, device=dev, dtype=torch.float16)
    w = torch.randn(512, 512, 7, device=dev, dtype=torch.float16)
    torch.nn.functional.conv1d(s, w, padding=3).sum().item()
    wt = torch.randn(512, 256, 16, device=dev, dtype=torch.float16)
    torch.nn.functional.conv_transpose1d(s, wt, stride=8, padding=4).sum().item()
    stage("cudnn")
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _add_one(p, n, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(p + i, tl.load(p + i, mask=i < n) + 1.0, mask=i < n)

        y = torch.zeros(4096, device=dev)
        _add_one[(4,)](y, 4096, BLOCK=1024)
        stage("triton")
    except ImportError:
        pass
    sig = torch.randn(4, 24000, device=dev)
    win = torch.hann_window(16, device=dev)
    spec = torch.stft(sig, 16, 4, 16, win, return_complex=True)
    torch.istft(spec, 16, 4, 16, win).sum().item()
    stage("cufft")
    static = torch.randn(64, 1024, device=dev, dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        static @ a
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        out = static @ a
    g.replay()
    stage("cuda_graph")
    del x, out
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
