"""Helpers shared by the token-service tests: a small CUDA engine over the tiny demo model, and a
runner that streams several requests through it at once (the CUDA-only engine tests)."""
from __future__ import annotations

import asyncio
from pathlib import Path

from token_service.engine import EngineConfig, LLMEngine, SamplingParams


def cuda_engine(model_dir: Path, **kw) -> LLMEngine:
    """An engine on CUDA with 8 slots of 640 positions and graph batch buckets (1, 2, 4, 8); ``kw``:
    more ``EngineConfig`` fields (``dtype``, ``cuda_graphs``, ``kernels``, ``compile``, ...)."""
    return LLMEngine(EngineConfig(model_dir=model_dir, device="cuda", max_slots=8, max_seq_len=640,
                                  default_max_new_tokens=200, graph_batch_sizes=(1, 2, 4, 8), **kw))


def run_all(eng: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    """Generate every ``(text ids, params)`` request concurrently (default voice); each one's speech tokens."""
    async def collect(ids, p):
        out = []
        async for chunk in eng.generate("default", ids, p):
            out.extend(chunk)
        return out

    async def run():
        return await asyncio.gather(*(collect(ids, p) for ids, p in requests))

    return asyncio.run(run())
