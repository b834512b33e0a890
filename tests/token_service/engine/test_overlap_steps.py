"""``EngineConfig.overlap_steps``: decode step N+1 is queued before step N's ids are read
(``overlap_depth`` 2: steps N+1 and N+2).

On CPU the steps run eagerly (the "in-flight" step has already run when it is collected), so these
tests check the engine's bookkeeping, which is the same on CUDA: the ids of a queued step go only to
the sequences it ran and are dropped for those that ended meanwhile, host positions track the
device's, ``overlap_depth`` KV positions are reserved for the extra steps, failures and shutdown never hang or leak a
slot, and the tokens equal the serial engine's and the single-sequence path's.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from token_service.engine import EngineConfig, LLMEngine, SamplingParams, TextError
from token_service.engine.model_runner import ModelRunner
from token_service.t3.config import STOP_SPEECH
from token_service.t3.generate import stream_speech_tokens
from token_service.t3.loader import load_t3, load_voice_conds_all
from token_service.t3.voice import build_voice_prefix
from tts_common.config import ConfigError

PREFIX = 376  # the tiny demo's voice prefix length


def _model(demo_tiny_dir, stop_bias: float = 0.0):
    """The tiny demo T3; ``stop_bias`` raises the stop token's logit so sampled streams end early (the
    plain model almost never samples it)."""
    model = load_t3(demo_tiny_dir).drop_unused().eval()
    with torch.no_grad():
        model.speech_head.bias[STOP_SPEECH] += stop_bias
    return model


DEPTHS = pytest.mark.parametrize("depth", [1, 2], ids=["depth-1", "depth-2"])


def _engine(demo_tiny_dir, model, overlap: bool, depth: int = 1, **kw) -> LLMEngine:
    cfg = dict(model_dir=demo_tiny_dir, device="cpu", max_slots=3, max_seq_len=PREFIX + 16 + 64, kv_bucket=8,
               max_waiting=64, default_max_new_tokens=40, overlap_steps=overlap, overlap_depth=depth)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), model=model)


def _reference(demo_tiny_dir, model):
    prefix = build_voice_prefix(model, load_voice_conds_all(demo_tiny_dir)["default"])
    return lambda ids, params: list(stream_speech_tokens(model, prefix, ids, params))


async def _collect(stream) -> list[int]:
    out = []
    async for ids in stream:
        out.extend(ids)
    return out


def _run_staggered(eng: LLMEngine, requests) -> list[list[int]]:
    """The first half of ``requests`` start at once; the rest join once the first stream has tokens."""
    half = len(requests) // 2

    async def run():
        first = [asyncio.create_task(_collect(eng.generate("default", ids, p))) for ids, p in requests[:half]]
        stream = eng.generate("default", *requests[half])
        head = await anext(stream, [])  # the batch is decoding now: the others join mid-way
        rest = [asyncio.create_task(_collect(eng.generate("default", ids, p))) for ids, p in requests[half + 1:]]
        tail = await _collect(stream)
        done = await asyncio.gather(*first)
        return done + [head + tail] + list(await asyncio.gather(*rest))

    return asyncio.run(run())


@pytest.mark.parametrize("stop_bias, max_slots", [(0.0, 3), (3.0, 3), (3.0, 1)],
                         ids=["budget-3-slots", "stop-3-slots", "stop-1-slot"])
def test_overlap_gives_the_serial_tokens(demo_tiny_dir, stop_bias, max_slots):
    """Greedy and seeded streams of different lengths, joining mid-way, ending by max_new_tokens
    (plain model) or by the stop token (stop_bias); through 1 slot, each stream takes the slot its
    predecessor left while that one's extra step(s) were queued. Serial, depth 1 and depth 2."""
    model = _model(demo_tiny_dir, stop_bias)
    reference = _reference(demo_tiny_dir, model)
    requests = [([3 + i, 100 + 7 * i, 7] * (1 + i % 3),
                  SamplingParams(seed=i, max_new_tokens=5 + 6 * i, top_k=[1, 1000, 50, 0][i % 4],
                                 temperature=0.8 + 0.1 * (i % 3))) for i in range(8)]
    want = [reference(ids, p) for ids, p in requests]
    if stop_bias:
        assert sum(len(w) < p.max_new_tokens for w, (_, p) in zip(want, requests)) >= 4  # stops do happen
    else:
        assert all(len(w) == p.max_new_tokens for w, (_, p) in zip(want, requests))  # every budget is hit
    stats = {}
    for depth in (0, 1, 2):  # 0: serial
        eng = _engine(demo_tiny_dir, model, depth > 0, max(depth, 1), max_slots=max_slots)
        try:
            assert _run_staggered(eng, requests) == want, depth
            stats[depth] = eng.stats()
        finally:
            eng.close()
    # the extra ids of the overlapped steps were dropped, not counted; same finished streams, no slot leaked
    for depth in (1, 2):
        for key in ("tokens", "finished", "failed", "cancelled", "free_slots", "active"):
            assert stats[depth][key] == stats[0][key], (depth, key)
        assert stats[depth]["finished"] == len(requests) and stats[depth]["free_slots"] == max_slots
    assert stats[2]["steps"] >= stats[1]["steps"] >= stats[0]["steps"]  # the extra steps ran


@DEPTHS
def test_host_positions_track_the_device_and_steps_really_overlap(demo_tiny_dir, monkeypatch, depth):
    """Every launch passes each row's device position (so its KV bucket covers the newest key, with
    8-position buckets crossed often), every running row is armed, and launches run ``depth`` steps
    ahead of collects (never more: the runner's host buffers hold depth + 1 steps)."""
    calls: list[str] = []
    outstanding = [0, 0]  # now, most
    launch, collect = ModelRunner.decode_launch, ModelRunner.decode_collect

    def checked_launch(self, running):
        for slot, pos in running:
            assert int(self.positions[slot]) == pos and int(self.active[slot]) == 1, (slot, pos)
            g = self.group_of(slot)
            _, kv_len = self.decode_key(slot - g.start + 1, max(p for _, p in running), g)
            assert kv_len >= pos + 1
        calls.append("L")
        outstanding[0] += 1
        outstanding[1] = max(outstanding)
        return launch(self, running)

    def counted_collect(self, handle):
        calls.append("C")
        outstanding[0] -= 1
        return collect(self, handle)

    monkeypatch.setattr(ModelRunner, "decode_launch", checked_launch)
    monkeypatch.setattr(ModelRunner, "decode_collect", counted_collect)
    model = _model(demo_tiny_dir)
    eng = _engine(demo_tiny_dir, model, True, depth)
    try:
        requests = [([5 + i, 9], SamplingParams(seed=i, max_new_tokens=20 + 9 * i)) for i in range(5)]
        reference = _reference(demo_tiny_dir, model)
        assert _run_staggered(eng, requests) == [reference(ids, p) for ids, p in requests]
    finally:
        eng.close()
    trace = "".join(calls)
    assert "L" * (depth + 1) + "C" in trace  # depth steps were queued while the oldest one's ids were unread
    assert outstanding == [0, depth + 1]
    assert trace.count("L") == trace.count("C")  # every queued step was read back (the last ones' ids dropped)
    assert not eng._inflight


class _HostEvent:
    """Stands in for ``torch.cuda.Event`` on CPU (the copies it guards have already happened)."""

    def __init__(self):
        self.records = self.waits = 0

    def record(self):
        self.records += 1

    def synchronize(self):
        self.waits += 1


@DEPTHS
def test_the_host_buffer_ring_keeps_each_queued_steps_ids(demo_tiny_dir, depth):
    """The CUDA read-back path on CPU: each launch copies ``sampled`` into the next of depth + 1 host
    buffers (a ring), so step N's ids are intact when read after steps N+1 .. N+depth were queued
    (which overwrote ``sampled``); the tokens equal the single-sequence path's."""
    model = _model(demo_tiny_dir, 3.0)
    eng = _engine(demo_tiny_dir, model, True, depth)
    r = eng.runner
    assert r.shape.overlap_depth == depth
    events = [_HostEvent() for _ in range(depth + 1)]
    r._host_ids, r._host_events = [torch.full((3,), -1, dtype=torch.long) for _ in range(depth + 1)], events
    try:
        requests = [([3 + i, 60 + i], SamplingParams(seed=20 + i, max_new_tokens=8 + 5 * i)) for i in range(6)]
        reference = _reference(demo_tiny_dir, model)
        assert _run_staggered(eng, requests) == [reference(ids, p) for ids, p in requests]
    finally:
        eng.close()
    assert all(e.records > 5 for e in events)
    assert sum(e.waits for e in events) == sum(e.records for e in events)  # every queued step was read once


@DEPTHS
def test_depth_kv_positions_are_reserved_and_used(demo_tiny_dir, depth):
    """With overlap a request may use max_seq_len - depth positions: its extra steps write the last
    ones (no out-of-bounds cache write); the serial engine may use all of them."""
    model = _model(demo_tiny_dir)
    reference = _reference(demo_tiny_dir, model)
    text, budget = [11, 12, 13], 30
    need = PREFIX + len(text) + budget
    p = SamplingParams(seed=4, max_new_tokens=budget)
    want = reference(text, p)
    assert len(want) == budget  # runs to the very last position
    serial = _engine(demo_tiny_dir, model, False, max_seq_len=need, default_max_new_tokens=20)
    try:
        assert asyncio.run(_collect(serial.generate("default", text, p))) == want
    finally:
        serial.close()
    eng = _engine(demo_tiny_dir, model, True, depth, max_seq_len=need, default_max_new_tokens=20)
    assert eng.reserved_positions == depth
    try:
        for over in range(depth):  # every budget that leaves fewer than depth positions is refused
            with pytest.raises(TextError, match=f"{depth} positions? for the overlapped steps? = {need + depth - over} "
                                                f"positions > max_seq_len {need}"):
                eng.generate("default", text, SamplingParams(seed=4, max_new_tokens=budget - over))
        short = SamplingParams(seed=4, max_new_tokens=budget - depth)
        assert asyncio.run(_collect(eng.generate("default", text, short))) == want[:budget - depth]
        s = eng.stats()
        assert (s["failed"], s["finished"], s["free_slots"]) == (0, 1, 3)
        assert eng.max_text_tokens == need - PREFIX - 20 - depth == serial.max_text_tokens - depth  # the text budget too
    finally:
        eng.close()


@DEPTHS
def test_streams_cancelled_mid_way_free_their_slots(demo_tiny_dir, depth):
    """Streams left after a few tokens (while their next steps are queued) end at once; the others
    keep the serial tokens, the freed slots are taken by new streams whose tokens are right too, and
    no slot leaks."""
    model = _model(demo_tiny_dir)
    reference = _reference(demo_tiny_dir, model)
    eng = _engine(demo_tiny_dir, model, True, depth)
    keep = [([7 + i, 3], SamplingParams(seed=30 + i, max_new_tokens=36)) for i in range(2)]
    late = [([9 + i, 4], SamplingParams(seed=40 + i, max_new_tokens=14 + 3 * i)) for i in range(3)]

    async def leave_after(n: int) -> list[int]:
        stream, out = eng.generate("default", [2, 5], SamplingParams(seed=50, max_new_tokens=40)), []
        async for ids in stream:
            out.extend(ids)
            if len(out) >= n:
                break
        await stream.aclose()
        return out

    async def run():
        kept = [asyncio.create_task(_collect(eng.generate("default", ids, p))) for ids, p in keep]
        left = await leave_after(4)
        joined = [asyncio.create_task(_collect(eng.generate("default", ids, p))) for ids, p in late]
        return left, await asyncio.gather(*kept), await asyncio.gather(*joined)

    try:
        left, kept, joined = asyncio.run(asyncio.wait_for(run(), timeout=60))
        full = reference([2, 5], SamplingParams(seed=50, max_new_tokens=40))
        assert len(left) >= 4 and left == full[:len(left)]
        assert kept == [reference(ids, p) for ids, p in keep]
        assert joined == [reference(ids, p) for ids, p in late]
        s = eng.stats()
        assert (s["active"], s["free_slots"], s["cancelled"], s["failed"], s["finished"]) == (0, 3, 1, 0, 5)
        assert not eng._inflight
    finally:
        eng.close()


def test_overlap_depth_must_be_at_least_one(demo_tiny_dir):
    with pytest.raises(ValueError, match="overlap_depth must be >= 1, got 0"):
        _engine(demo_tiny_dir, _model(demo_tiny_dir), True, 0)


def _collect_raises_at(monkeypatch, k: int, exc: BaseException) -> None:
    """``ModelRunner.decode_collect`` raises ``exc`` on its ``k``-th call (the others read ids as usual)."""
    collect, n = ModelRunner.decode_collect, [0]

    def failing(self, handle):
        n[0] += 1
        if n[0] == k:
            raise exc
        return collect(self, handle)

    monkeypatch.setattr(ModelRunner, "decode_collect", failing)


@DEPTHS
def test_a_failed_collect_fails_the_streams_and_the_engine_goes_on(demo_tiny_dir, monkeypatch, depth):
    model = _model(demo_tiny_dir)
    eng = _engine(demo_tiny_dir, model, True, depth)
    _collect_raises_at(monkeypatch, 4, RuntimeError("simulated device error"))
    try:
        async def run():
            streams = [eng.generate("default", [1 + i, 2], SamplingParams(seed=i, max_new_tokens=30)) for i in range(3)]
            return await asyncio.gather(*(_collect(s) for s in streams), return_exceptions=True)

        results = asyncio.run(asyncio.wait_for(run(), timeout=20))
        assert all(isinstance(r, RuntimeError) and "simulated" in str(r) for r in results)
        s = eng.stats()
        assert (s["active"], s["free_slots"], s["failed"]) == (0, 3, 3)
        assert not eng._inflight
        p = SamplingParams(seed=7, max_new_tokens=12)
        assert asyncio.run(_collect(eng.generate("default", [4, 5], p))) == _reference(demo_tiny_dir, model)([4, 5], p)
    finally:
        eng.close()


class _Die(BaseException):
    """Not an ``Exception``: escapes the step's handler and ends the engine thread."""


@DEPTHS
def test_engine_thread_death_mid_stream_fails_the_streams(demo_tiny_dir, monkeypatch, depth):
    eng = _engine(demo_tiny_dir, _model(demo_tiny_dir), True, depth)
    _collect_raises_at(monkeypatch, 3, _Die("simulated thread death"))
    try:
        async def run():
            streams = [eng.generate("default", [1 + i, 2], SamplingParams(seed=i, max_new_tokens=30)) for i in range(2)]
            return await asyncio.gather(*(_collect(s) for s in streams), return_exceptions=True)

        results = asyncio.run(asyncio.wait_for(run(), timeout=20))
        assert all(isinstance(r, RuntimeError) and "stopped" in str(r) for r in results)
        eng._thread.join(timeout=10)
        assert not eng._thread.is_alive() and eng.stats()["active"] == 0
    finally:
        eng.close()


@DEPTHS
def test_close_mid_stream_ends_it_with_an_error(demo_tiny_dir, depth):
    eng = _engine(demo_tiny_dir, _model(demo_tiny_dir), True, depth)

    async def run():
        stream = eng.generate("default", [3, 4], SamplingParams(seed=1, max_new_tokens=60))
        assert await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, eng.close)
        with pytest.raises(RuntimeError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert not eng._thread.is_alive() and eng.stats()["active"] == 0


def test_service_setting_reaches_the_engine_config(monkeypatch, demo_tiny_dir):
    """``--t3-overlap-steps`` / ``TTS_T3_OVERLAP_STEPS`` (service default on, engine default off) end up in
    ``EngineConfig.overlap_steps``; ``--kv-first-group`` / ``TTS_KV_FIRST_GROUP`` in ``kv_first_group``."""
    import token_service.engine as engine_pkg
    from token_service.config import TokenServiceConfig
    from token_service.engine_loader import load_engine
    from tts_common.config import load_config

    seen: list[EngineConfig] = []

    class Recorder:
        def __init__(self, config):
            seen.append(config)
            self.device, self.dtype, self.compile_status, self.kernels_status = "cpu", "float32", "off", "torch"

        def voices(self):
            return ["default"]

    monkeypatch.setattr(engine_pkg, "LLMEngine", Recorder)
    assert EngineConfig(model_dir=demo_tiny_dir).overlap_steps is False
    for argv, env, want in (([], {}, True), (["--t3-overlap-steps", "false"], {}, False),
                            ([], {"TTS_T3_OVERLAP_STEPS": "0"}, False),
                            (["--t3-overlap-steps", "on"], {"TTS_T3_OVERLAP_STEPS": "off"}, True)):
        cfg = load_config(TokenServiceConfig, argv, env, model_dir=str(demo_tiny_dir))
        load_engine(cfg)
        assert cfg.t3_overlap_steps is want and seen[-1].overlap_steps is want
    assert seen[-1].kv_first_group == 8  # the service default, as the engine's
    assert seen[-1].overlap_depth == 1 and EngineConfig(model_dir=demo_tiny_dir).overlap_depth == 1  # the defaults
    for argv, env, want in ((["--t3-overlap-depth", "2"], {}, 2), ([], {"TTS_T3_OVERLAP_DEPTH": "3"}, 3),
                            (["--t3-overlap-depth", "2"], {"TTS_T3_OVERLAP_DEPTH": "3"}, 2)):
        cfg = load_config(TokenServiceConfig, argv, env, model_dir=str(demo_tiny_dir))
        load_engine(cfg)
        assert cfg.t3_overlap_depth == want and seen[-1].overlap_depth == want
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="t3_overlap_depth"):
            load_config(TokenServiceConfig, ["--t3-overlap-depth", bad], {}, model_dir=str(demo_tiny_dir))
    for argv, env, want in ((["--kv-first-group", "0"], {}, 0), ([], {"TTS_KV_FIRST_GROUP": "2"}, 2)):
        load_engine(load_config(TokenServiceConfig, argv, env, model_dir=str(demo_tiny_dir)))
        assert seen[-1].kv_first_group == want
    with pytest.raises(ConfigError, match="kv_first_group"):
        load_config(TokenServiceConfig, ["--kv-first-group", "-1"], {}, model_dir=str(demo_tiny_dir))
    assert seen[-1].prefill_rows == 4  # --prefill-rows / TTS_PREFILL_ROWS: staged prefill rows
    for argv, env, want in ((["--prefill-rows", "1"], {}, 1), ([], {"TTS_PREFILL_ROWS": "2"}, 2)):
        load_engine(load_config(TokenServiceConfig, argv, env, model_dir=str(demo_tiny_dir)))
        assert seen[-1].prefill_rows == want
    with pytest.raises(ConfigError, match="prefill_rows"):
        load_config(TokenServiceConfig, ["--prefill-rows", "0"], {}, model_dir=str(demo_tiny_dir))
    with pytest.raises(ConfigError, match="cuda_stack_bytes"):
        load_config(TokenServiceConfig, ["--cuda-stack-bytes", "-1"], {}, model_dir=str(demo_tiny_dir))
