"""The CUDA-only parts of the model runner (graph capture / replay, bf16). Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from tests.token_service.helpers import cuda_engine, run_all
from token_service.engine import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("kernels, n_graphs", [
    ("torch", 4 * 3),  # batch buckets (1,2,4,8) × kv buckets (256,512,640)
    ("triton", 2 + 2 * 3),  # buckets 1, 2: one Triton graph each (any KV length); 4, 8: per KV bucket
])
def test_graph_replay_equals_eager(demo_tiny_dir, kernels, n_graphs):
    requests = [([1 + i, 50 + i, 7] * (1 + i % 2), SamplingParams(seed=i, max_new_tokens=30)) for i in range(6)]
    graphs = cuda_engine(demo_tiny_dir, dtype="float32", cuda_graphs=True, kernels=kernels)
    eager = cuda_engine(demo_tiny_dir, dtype="float32", cuda_graphs=False, kernels=kernels)
    try:
        assert graphs.kernels_status in (kernels, kernels + "+pdl")  # triton+pdl: sm_90+ (t3.triton_decode)
        assert len(graphs.runner.graphs) == n_graphs
        assert not eager.runner.graphs
        assert run_all(graphs, requests) == run_all(eager, requests)
    finally:
        graphs.close()
        eager.close()


def test_bf16_engine_streams(demo_tiny_dir):
    requests = [([1 + i, 50 + i, 7], SamplingParams(seed=i, max_new_tokens=20)) for i in range(10)]
    eng = cuda_engine(demo_tiny_dir)  # auto dtype on CUDA = bfloat16
    try:
        assert eng.dtype == torch.bfloat16 and eng.runner.graphs
        for (_, p), got in zip(requests, run_all(eng, requests)):
            assert len(got) <= p.max_new_tokens and all(0 <= t < 6561 for t in got)
        s = eng.stats()
        assert (s["active"], s["free_slots"]) == (0, 8)
    finally:
        eng.close()


def test_compiled_step_in_graphs_equals_eager(demo_tiny_dir):
    """``compile=True``: the segments compile before capture, the graphs replay the Triton kernels, and
    an fp32 engine decodes what the eager fp32 engine decodes (greedy and seeded)."""
    requests = [([1 + i, 50 + i, 7] * (1 + i % 2), SamplingParams(seed=i, max_new_tokens=30, top_k=1 if i % 2 else 1000))
                for i in range(6)]
    compiled = cuda_engine(demo_tiny_dir, dtype="float32", cuda_graphs=True, compile=True, kernels="torch")
    eager = cuda_engine(demo_tiny_dir, dtype="float32", cuda_graphs=False, kernels="torch")
    try:
        assert compiled.compile_status == "on" and compiled.stats()["compiled"] == 1
        assert len(compiled.runner.graphs) == 4 * 3
        assert run_all(compiled, requests) == run_all(eager, requests)
    finally:
        compiled.close()
        eager.close()


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_overlapped_steps_decode_what_serial_steps_decode(demo_tiny_dir, kernels, depth):
    """``overlap_steps``: steps N+1 .. N+depth are queued (graph replay, ids copied to a ring of
    depth + 1 pinned buffers) before step N's ids are read; the fp32 tokens equal the serial engine's,
    streams leave early (small budgets) and new ones take their slots while steps are in flight."""
    requests = [([1 + i, 50 + i, 7] * (1 + i % 2), SamplingParams(seed=i, max_new_tokens=3 + 7 * i,
                 top_k=1 if i % 3 == 0 else 1000)) for i in range(12)]
    serial = cuda_engine(demo_tiny_dir, dtype="float32", kernels=kernels)
    overlap = cuda_engine(demo_tiny_dir, dtype="float32", kernels=kernels, overlap_steps=True, overlap_depth=depth)
    try:
        assert overlap.kernels_status in (kernels, kernels + "+pdl") and overlap.runner.graphs
        assert len(overlap.runner._host_ids) == len(overlap.runner._host_events) == depth + 1
        assert run_all(overlap, requests) == run_all(serial, requests)
        a, b = overlap.stats(), serial.stats()
        assert (a["tokens"], a["finished"], a["free_slots"]) == (b["tokens"], b["finished"], 8)
    finally:
        serial.close()
        overlap.close()
