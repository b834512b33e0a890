"""The token engine on the tiny demo folder (CPU, float32): continuous batching, cancel, stats.

Every test runs with ``overlap_steps`` off and on (step N+1 queued before step N's ids are read):
the behaviour and the tokens must be the same."""
from __future__ import annotations

import asyncio

import pytest

from token_service.engine import EngineConfig, EngineOverloaded, LLMEngine, SamplingParams, TextError
from token_service.t3.generate import stream_speech_tokens
from token_service.t3.loader import load_t3, load_voice_conds_all
from token_service.t3.voice import build_voice_prefix


@pytest.fixture(scope="module", params=[False, True], ids=["serial", "overlap"])
def overlap(request) -> bool:
    return request.param


@pytest.fixture(scope="module")
def engine(demo_tiny_dir, overlap):
    eng = LLMEngine(EngineConfig(model_dir=demo_tiny_dir, device="cpu", max_slots=4, max_seq_len=376 + 64 + 200,
                                 max_waiting=64, default_max_new_tokens=200, overlap_steps=overlap))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(demo_tiny_dir):
    model = load_t3(demo_tiny_dir).drop_unused()
    prefix = build_voice_prefix(model, load_voice_conds_all(demo_tiny_dir)["default"])
    return lambda ids, params: list(stream_speech_tokens(model, prefix, ids, params))


async def _collect(stream):
    out = []
    async for ids in stream:
        assert ids and all(0 <= t < 6561 for t in ids)
        out.extend(ids)
    return out


def test_voices_and_tokenize(engine):
    assert engine.voices() == ["default"]
    ids = engine.tokenize("Hello there [laugh]")
    assert ids and ids[-1] != 50257 and 50257 in ids
    with pytest.raises(TextError, match="empty"):
        engine.tokenize("")
    with pytest.raises(TextError, match="too long"):
        engine.tokenize("word " * 100)  # limit = 640 - 376 - 200 = 64 tokens


def test_bad_requests_name_the_problem(engine):
    with pytest.raises(ValueError, match="unknown voice 'nobody'; available: default"):
        engine.generate("nobody", [1, 2], SamplingParams())
    with pytest.raises(TextError, match="text_ids is empty"):
        engine.generate("default", [], SamplingParams())
    with pytest.raises(ValueError, match="out of range"):
        engine.generate("default", [1, 99999], SamplingParams())
    with pytest.raises(TextError, match="max_seq_len"):
        engine.generate("default", [1] * 60, SamplingParams(max_new_tokens=1001))


def test_concurrent_streams_complete_and_match_the_single_sequence_path(engine, reference):
    """12 streams through 4 slots: they queue, join and leave the batch between steps; each one's
    tokens equal the plain single-sequence path with the same seed (sampling is batch-independent)."""
    requests = [([1 + i, 200 + 7 * i, 3000 + i] * (1 + i % 3), SamplingParams(seed=i, max_new_tokens=10 + 5 * i,
                 temperature=0.8 + 0.05 * (i % 4), top_k=[1000, 50, 0][i % 3])) for i in range(12)]

    async def run():
        return await asyncio.gather(*(_collect(engine.generate("default", ids, p)) for ids, p in requests))

    results = asyncio.run(run())
    for (ids, p), got in zip(requests, results):
        assert got == reference(ids, p)
        assert len(got) <= p.max_new_tokens
    s = engine.stats()
    assert s["active"] == 0 and s["free_slots"] == 4 and s["running"] == 0


def test_cancel_frees_the_slot_at_once(engine):
    async def run():
        stream = engine.generate("default", [5, 6, 7], SamplingParams(seed=1, max_new_tokens=200, top_k=0,
                                                                      repetition_penalty=1.0, temperature=1.0))
        first = await stream.__anext__()
        assert first
        assert engine.stats()["running"] == 1 and engine.stats()["free_slots"] == 3
        await stream.aclose()
        s = engine.stats()
        assert s["running"] == 0 and s["free_slots"] == 4 and s["active"] == 0

        # cancelling the consuming task frees the slot too
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate("default", [8, 9], SamplingParams(seed=2, max_new_tokens=200)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert engine.stats()["free_slots"] == 3
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.stats()["free_slots"] == 4
        # and the engine keeps serving afterwards
        assert await _collect(engine.generate("default", [1, 2], SamplingParams(seed=3, max_new_tokens=5)))

    asyncio.run(run())


def test_stats_while_running_and_overload(demo_tiny_dir, overlap):
    eng = LLMEngine(EngineConfig(model_dir=demo_tiny_dir, device="cpu", max_slots=2, max_seq_len=640,
                                 max_waiting=1, default_max_new_tokens=200, overlap_steps=overlap))
    try:
        async def run():
            p = SamplingParams(seed=0, max_new_tokens=200, top_k=0, temperature=1.0, repetition_penalty=1.0)
            a, b, c, d = (eng.generate("default", [1, 2, 3], p) for _ in range(4))
            await a.__anext__(), await b.__anext__()  # both slots taken
            c_next = asyncio.create_task(c.__anext__())  # queued: no free slot
            await asyncio.sleep(0.05)
            s = eng.stats()
            assert (s["running"], s["waiting"], s["active"], s["free_slots"]) == (2, 1, 3, 0)
            with pytest.raises(EngineOverloaded, match="engine is full: 2 running and 1 waiting"):
                await d.__anext__()
            await a.aclose()  # frees a slot: c is admitted and starts streaming
            assert await c_next
            s = eng.stats()
            assert (s["running"], s["waiting"]) == (2, 0)
            await b.aclose()
            await c.aclose()
            s = eng.stats()
            assert (s["running"], s["waiting"], s["free_slots"], s["cancelled"]) == (0, 0, 2, 3)

        asyncio.run(run())
    finally:
        eng.close()


def test_many_streams_with_random_cancels_leak_nothing(demo_tiny_dir, overlap):
    """40 streams through 6 slots; every third one is abandoned after its first chunk."""
    eng = LLMEngine(EngineConfig(model_dir=demo_tiny_dir, device="cpu", max_slots=6, max_seq_len=640,
                                 max_waiting=64, default_max_new_tokens=200, overlap_steps=overlap))
    try:
        async def one(i):
            stream = eng.generate("default", [10 + i, 20, 30 + i], SamplingParams(seed=i, max_new_tokens=8 + i % 13))
            got = []
            async for ids in stream:
                got.extend(ids)
                if i % 3 == 0:
                    await stream.aclose()
                    return None
            return got

        async def run():
            return await asyncio.gather(*(one(i) for i in range(40)))

        results = asyncio.run(run())
        for i, got in enumerate(results):
            if i % 3:
                assert got is not None and len(got) <= 8 + i % 13
        s = eng.stats()
        assert (s["active"], s["running"], s["waiting"], s["free_slots"]) == (0, 0, 0, 6)
        assert s["cancelled"] + s["finished"] == 40
    finally:
        eng.close()


def test_streams_across_lazily_allocated_kv_groups(demo_tiny_dir, reference, overlap):
    """Slot groups of 1, 1, 2: a group's KV cache appears when one of its slots is first used, and
    streams spread over several groups still equal the single-sequence path."""
    eng = LLMEngine(EngineConfig(model_dir=demo_tiny_dir, device="cpu", max_slots=4, max_seq_len=376 + 64 + 200,
                                 default_max_new_tokens=200, kv_first_group=1, overlap_steps=overlap))
    try:
        assert [g.size for g in eng.runner.groups] == [1, 1, 2]
        assert [g.cache is not None for g in eng.runner.groups] == [True, False, False]
        requests = [([3 + i, 100 + i] * (1 + i % 2), SamplingParams(seed=10 + i, max_new_tokens=8 + 3 * i,
                     top_k=[1000, 0][i % 2])) for i in range(6)]

        async def run():
            return await asyncio.gather(*(_collect(eng.generate("default", ids, p)) for ids, p in requests))

        for (ids, p), got in zip(requests, asyncio.run(run())):
            assert got == reference(ids, p)
        assert all(g.cache is not None for g in eng.runner.groups)
        assert eng.stats()["free_slots"] == 4
    finally:
        eng.close()
