"""The CUDA-only parts of the model runner (graph capture / replay, bf16). Skipped without a GPU."""
from __future__ import annotations

import asyncio

import pytest
import torch

from token_service.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _engine(demo_tiny_dir, **kw):
    return LLMEngine(EngineConfig(model_dir=demo_tiny_dir, device="cuda", max_slots=8, max_seq_len=640,
                                  default_max_new_tokens=200, graph_batch_sizes=(1, 2, 4, 8), **kw))


def _run_all(eng, requests):
    async def collect(ids, p):
        out = []
        async for chunk in eng.generate("default", ids, p):
            out.extend(chunk)
        return out

    async def run():
        return await asyncio.gather(*(collect(ids, p) for ids, p in requests))

    return asyncio.run(run())


@pytest.mark.parametrize("kernels, n_graphs", [
    ("torch", 4 * 3),  # batch buckets (1,2,4,8) × kv buckets (256,512,640)
    ("triton", 2 + 2 * 3),  # buckets 1, 2: one Triton graph each (any KV length); 4, 8: per KV bucket
])
def test_graph_replay_equals_eager(demo_tiny_dir, kernels, n_graphs):
    requests = [([1 + i, 50 + i, 7] * (1 + i % 2), SamplingParams(seed=i, max_new_tokens=30)) for i in range(6)]
    graphs = _engine(demo_tiny_dir, dtype="float32", cuda_graphs=True, kernels=kernels)
    eager = _engine(demo_tiny_dir, dtype="float32", cuda_graphs=False, kernels=kernels)
    try:
        assert graphs.kernels_status == kernels
        assert len(graphs.runner.graphs) == n_graphs
        assert not eager.runner.graphs
        assert _run_all(graphs, requests) == _run_all(eager, requests)
    finally:
        graphs.close()
        eager.close()


def test_bf16_engine_streams(demo_tiny_dir):
    requests = [([1 + i, 50 + i, 7], SamplingParams(seed=i, max_new_tokens=20)) for i in range(10)]
    eng = _engine(demo_tiny_dir)  # auto dtype on CUDA = bfloat16
    try:
        assert eng.dtype == torch.bfloat16 and eng.runner.graphs
        for (_, p), got in zip(requests, _run_all(eng, requests)):
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
    compiled = _engine(demo_tiny_dir, dtype="float32", cuda_graphs=True, compile=True, kernels="torch")
    eager = _engine(demo_tiny_dir, dtype="float32", cuda_graphs=False, kernels="torch")
    try:
        assert compiled.compile_status == "on" and compiled.stats()["compiled"] == 1
        assert len(compiled.runner.graphs) == 4 * 3
        assert _run_all(compiled, requests) == _run_all(eager, requests)
    finally:
        compiled.close()
        eager.close()
