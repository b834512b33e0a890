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


CU_LIMITS = {"stack": 0x00, "printf_fifo": 0x01, "malloc_heap": 0x02}  # CUlimit codes (driver API), bytes


def _libcuda():
    import ctypes

    return ctypes.CDLL("libcuda.so.1")


def cuda_limits() -> dict[str, int | None]:
    """The current CUDA context's limits in bytes (``stack`` per thread, ``printf_fifo``,
    ``malloc_heap``; None where the driver does not answer), read through ``libcuda``."""
    import ctypes

    cu, out = _libcuda(), {}
    for name, code in CU_LIMITS.items():
        v = ctypes.c_size_t()
        out[name] = int(v.value) if cu.cuCtxGetLimit(ctypes.byref(v), ctypes.c_int(code)) == 0 else None
    return out


def limit_cuda_stack(nbytes: int, device: str = "auto") -> int | None:
    """Set the CUDA context's per-thread stack limit to ``nbytes`` on ``device`` (``auto``, ``cuda``,
    ``cuda:N``; anything else, ``nbytes <= 0`` or no CUDA: nothing, returns ``None``); returns the
    limit read back.

    The driver reserves stack memory for every thread the GPU can hold at once (SMs x threads per SM
    x the limit): with the default 1 KB that is ~270 MB of an H100's memory per process, outside
    torch's allocator. Measured (bench/memory_breakdown.py --stack-bytes, bench/NOTES.md run 57): a
    bare context 612 MB -> 414 MB at 256 bytes. Kernels whose own frames need more still run (the
    driver grows the reservation for them), so this only trims the default. Initialises CUDA on
    ``device`` (its primary context) and calls ``cuCtxSetLimit`` through ``libcuda`` with ctypes.
    """
    if nbytes <= 0:
        return None
    import ctypes

    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    with torch.cuda.device(dev):
        torch.zeros(1, device=dev)  # the primary context exists and is current on this thread
        rc = _libcuda().cuCtxSetLimit(ctypes.c_int(CU_LIMITS["stack"]), ctypes.c_size_t(nbytes))
        if rc != 0:
            raise RuntimeError(f"cuCtxSetLimit(CU_LIMIT_STACK_SIZE, {nbytes}) failed with CUresult {rc}")
        return cuda_limits()["stack"]
