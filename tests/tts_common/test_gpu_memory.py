"""tts_common.gpu_memory: the allocator figures and the CUDA stack limit (CPU checks; one CUDA check)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tts_common.gpu_memory import gpu_memory_mb, limit_cuda_stack


def test_stack_limit_is_a_no_op_without_cuda_or_when_zero():
    assert limit_cuda_stack(0, "auto") is None
    assert limit_cuda_stack(256, "cpu") is None
    if not torch.cuda.is_available():
        assert limit_cuda_stack(256, "auto") is None
        assert gpu_memory_mb() == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stack_limit_reads_back_and_kernels_still_run():
    """In a fresh process: the limit reads back, and cuBLAS / cuDNN / a Triton-free graph still run."""
    code = (
        "import torch\n"
        "from tts_common.gpu_memory import limit_cuda_stack\n"
        "assert limit_cuda_stack(256, 'cuda') == 256\n"
        "a = torch.randn(256, 256, device='cuda', dtype=torch.float16)\n"
        "s = torch.randn(2, 64, 100, device='cuda', dtype=torch.float16)\n"
        "w = torch.randn(64, 64, 7, device='cuda', dtype=torch.float16)\n"
        "y = torch.nn.functional.conv1d(s, w, padding=3)\n"
        "ref = torch.nn.functional.conv1d(s.float(), w.float(), padding=3)\n"
        "assert (y.float() - ref).abs().max() < 0.5, 'conv'\n"
        "assert ((a @ a).float() - a.float() @ a.float()).abs().max() < 0.5, 'matmul'\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
