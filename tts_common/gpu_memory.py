"""This process's CUDA memory as the caching allocator sees it (for the engine-statistics lines).

``gpu_memory_mb()`` -> ``{"allocated_MB", "reserved_MB", "peak_reserved_MB"}`` on the current CUDA
device, or ``{}`` where torch is not imported, CUDA is absent or not initialised yet (never initialises
it). What ``nvidia-smi`` shows for the process is ``reserved`` + the CUDA context (kernels, cuBLAS/cuDNN
handles and workspaces outside the allocator) + memory allocated outside torch (none here): the bench
reports both, so the difference is the context's share.
"""
from __future__ import annotations

import sys


def gpu_memory_mb() -> dict[str, float]:
    torch = sys.modules.get("torch")  # a CPU-only service never imports CUDA state for this
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    mb = 1024 * 1024
    return {"allocated_MB": round(torch.cuda.memory_allocated() / mb, 1),
            "reserved_MB": round(torch.cuda.memory_reserved() / mb, 1),
            "peak_reserved_MB": round(torch.cuda.max_memory_reserved() / mb, 1)}
