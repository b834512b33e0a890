"""If the engine's step thread itself dies, open and new streams end with an error, never hang."""
from __future__ import annotations

import asyncio

import pytest

from token_service.engine import EngineConfig, LLMEngine, SamplingParams


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_streams_fail_instead_of_hanging_when_the_engine_thread_dies(demo_tiny_dir, monkeypatch, overlap):
    def boom(self):
        raise RuntimeError("simulated crash at thread start")

    monkeypatch.setattr(LLMEngine, "_loop_body", boom)
    eng = LLMEngine(EngineConfig(model_dir=demo_tiny_dir, device="cpu", max_slots=2, max_seq_len=376 + 64 + 50,
                                 default_max_new_tokens=50, overlap_steps=overlap))
    eng._thread.join(timeout=10)
    assert not eng._thread.is_alive()

    async def run():
        ids = eng.tokenize("Hello there.")
        stream = eng.generate("default", ids, SamplingParams(max_new_tokens=10, seed=0))
        async for _ in stream:
            pass

    with pytest.raises(RuntimeError, match="shut down|stopped"):
        asyncio.run(asyncio.wait_for(run(), timeout=10))
    assert eng.stats()["active"] == 0
