"""Opt-in ``torch.compile``'d decode step (``EngineConfig.compile``), on CPU (inductor's C++ backend).

The compiled segments must compute what the eager step computes: same logits (fusion rounding
only), same K/V writes, same sampled ids, same greedy tokens through the whole engine; and a
failing compile must leave a working eager engine behind.
"""
from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from token_service.engine import EngineConfig, LLMEngine, SamplingParams
from token_service.t3.compiled import CompiledDecode
from token_service.t3.generate import decode_step
from token_service.t3.loader import load_t3
from token_service.t3.model import KVCache
from token_service.t3.sampling import process_logits_topk, row_values, sample, vocab_hash

MAX_SEQ_LEN = 376 + 64 + 48
TEXTS = ["Hello there, how are you?", "Please hold while I look that up.", "One more, then we stop.", "Okay!"]


def _config(model_dir, compile: bool) -> EngineConfig:
    """4 slots in two KV groups of 2 (the second one grows on demand), one batch bucket (2): every
    segment compiles once, for 2 rows, and both groups share that code."""
    return EngineConfig(model_dir=model_dir, device="cpu", max_slots=4, max_seq_len=MAX_SEQ_LEN, kv_first_group=2,
                        graph_batch_sizes=(2,), default_max_new_tokens=48, compile=compile)


async def _collect(eng, ids, params):
    out = []
    async for chunk in eng.generate("default", ids, params):
        out.extend(chunk)
    return out


def _run_all(eng, params_of):
    """All texts at once: both slot groups run, each in batch-2 decode steps."""
    async def go():
        return await asyncio.gather(*[_collect(eng, eng.tokenize(t), params_of(i)) for i, t in enumerate(TEXTS)])
    return asyncio.run(go())


@pytest.fixture(scope="module")
def engines(demo_tiny_dir):
    eager = LLMEngine(_config(demo_tiny_dir, False))
    compiled = LLMEngine(_config(demo_tiny_dir, True))
    yield eager, compiled
    eager.close()
    compiled.close()


@torch.inference_mode()
def test_compiled_segments_equal_the_eager_decode_step(demo_tiny_dir):
    torch.manual_seed(0)
    model = load_t3(demo_tiny_dir).drop_unused().eval()
    cfg = model.cfg
    caches = [KVCache(cfg, 2, MAX_SEQ_LEN) for _ in range(2)]
    for t in caches[0].k + caches[0].v:
        t.normal_()
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        b.copy_(a)
    cd = CompiledDecode(model)
    tokens, positions = torch.tensor([17, 4000]), torch.tensor([380, 401])
    for _ in range(3):  # consecutive steps: each one reads what the previous one wrote
        ref = decode_step(model, caches[0], 2, tokens, positions, MAX_SEQ_LEN)
        got = cd.logits(caches[1], 2, tokens, positions, MAX_SEQ_LEN)
        assert got.dtype == torch.float32 and got.shape == ref.shape == (2, cfg.speech_vocab_size)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        tokens, positions = ref.argmax(-1), positions + 1
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # same K/V written, nothing else touched

    # the compiled sampler (default settings: temperature, top-k, top-p, repetition penalty)
    V = cfg.speech_vocab_size
    rv = row_values(SamplingParams(), V)
    logits = ref * 40  # a peaked distribution: top-p actually cuts
    seen = torch.zeros(2, V, dtype=torch.bool)
    seen[:, [5, 17, int(logits[0].argmax())]] = True
    args = (logits, seen, torch.full((2,), rv["temperature"]), torch.full((2,), rv["top_k"]),
            torch.full((2,), rv["top_p_threshold"]), torch.full((2,), rv["top_p_on"]), torch.full((2,), rv["penalty"]))
    vh = vocab_hash(V, "cpu")
    for step in range(5):
        seed, st = torch.tensor([3, 11]), torch.tensor([step, step + 7])
        want = sample(process_logits_topk(*args).softmax(-1), seed, st, vh)
        assert torch.equal(cd.sample(*args, seed, st, vh, 1024), want)


def test_compiled_engine_decodes_the_same_tokens(engines):
    eager, compiled = engines
    assert (eager.compile_status, compiled.compile_status) == ("off", "on")
    assert (eager.stats()["compiled"], compiled.stats()["compiled"]) == (0, 1)
    greedy = lambda i: SamplingParams(top_k=1, max_new_tokens=48, seed=0)  # noqa: E731
    want = _run_all(eager, greedy)
    assert _run_all(compiled, greedy) == want
    assert all(len(w) > 5 for w in want)
    seeded = lambda i: SamplingParams(max_new_tokens=48, seed=100 + i)  # noqa: E731
    assert _run_all(compiled, seeded) == _run_all(eager, seeded)
    # top_k 0 (off) takes the eager full-sort sampler after the compiled model segments
    mixed = lambda i: SamplingParams(top_k=0 if i % 2 else 1000, max_new_tokens=48, seed=7 + i)  # noqa: E731
    assert _run_all(compiled, mixed) == _run_all(eager, mixed)
    s = compiled.stats()
    assert (s["active"], s["free_slots"], s["compiled"]) == (0, 4, 1)
    assert all(g.cache is not None for g in compiled.runner.groups)  # the second group grew, compiled


def test_a_failing_compile_falls_back_to_the_eager_step(demo_tiny_dir, engines, monkeypatch, caplog):
    def broken(self, *a, **k):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(CompiledDecode, "logits", broken)
    with caplog.at_level(logging.WARNING, logger="token_service.engine.model_runner"):
        eng = LLMEngine(_config(demo_tiny_dir, True))
    try:
        assert eng.stats()["compiled"] == 0
        assert eng.compile_status.startswith("fallback: compiling the decode step") and "inductor exploded" in eng.compile_status
        assert any("torch.compile disabled" in r.getMessage() for r in caplog.records)
        greedy = lambda i: SamplingParams(top_k=1, max_new_tokens=20, seed=0)  # noqa: E731
        assert _run_all(eng, greedy) == _run_all(engines[0], greedy)
    finally:
        eng.close()


def test_bad_compile_mode_is_refused(demo_tiny_dir):
    cfg = _config(demo_tiny_dir, True)
    cfg.compile_mode = "turbo"
    with pytest.raises(ValueError, match="compile_mode must be one of default, max-autotune-no-cudagraphs"):
        LLMEngine(cfg)


def test_service_setting_reaches_the_engine_config(monkeypatch, demo_tiny_dir):
    """``--compile`` / ``TTS_COMPILE`` (off by default) end up in ``EngineConfig.compile``."""
    import token_service.engine as engine_pkg
    from token_service.config import TokenServiceConfig
    from token_service.engine_loader import load_engine
    from tts_common.config import ConfigError, load_config

    seen = []

    class Recorder:
        def __init__(self, config):
            seen.append(config)
            self.device, self.dtype, self.compile_status = "cpu", "float32", "on" if config.compile else "off"
            self.kernels_status = config.kernels

        def voices(self):
            return ["default"]

    monkeypatch.setattr(engine_pkg, "LLMEngine", Recorder)
    base = dict(model_dir=str(demo_tiny_dir))
    for argv, env, want in (([], {}, False), (["--compile", "true"], {}, True), ([], {"TTS_COMPILE": "1"}, True),
                            (["--compile", "false"], {"TTS_COMPILE": "true"}, False)):
        cfg = load_config(TokenServiceConfig, argv, env, **base)
        assert cfg.compile is want
        load_engine(cfg)
        assert seen[-1].compile is want
    with pytest.raises(ConfigError, match="--compile / TTS_COMPILE"):
        load_config(TokenServiceConfig, ["--compile", "maybe"], {}, **base)
