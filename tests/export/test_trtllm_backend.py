"""Token engine on the TensorRT-LLM executor API, against a fake of ``tensorrt_llm.bindings.executor``."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from export.pipeline import export_trtllm
from export.t3_for_trt import create_t3_for_trt
from export.trtllm_checkpoint import BuildLimits
from export.voice_prefix import compute_voice_prefix, load_t3_state_dict
from token_service.engine.trtllm_backend import TRTLLMEngine
from token_service.t3.sampling import SamplingParams
from token_service.t3.text import TextError

sys.path.insert(0, str(Path(__file__).parent))
import fake_trtllm_executor as tle  # noqa: E402


@pytest.fixture(scope="module")
def engine_dir(demo_tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trtllm_engine")
    export_trtllm(demo_tiny_dir, "default", out, BuildLimits(dtype="float32", max_text_tokens=64,
                                                             max_new_tokens=40, max_batch_size=4))
    return out


@pytest.fixture
def engine(engine_dir, demo_tiny_dir):
    e = TRTLLMEngine(engine_dir, demo_tiny_dir, max_streams=2, tle=tle, device="cpu",
                     executor=tle.Executor(engine_dir, tle.ModelType.DECODER_ONLY, tle.ExecutorConfig()))
    yield e
    e.close()


async def collect(stream) -> list[int]:
    out = []
    async for ids in stream:
        out.extend(ids)
    return out


def test_greedy_stream_equals_t3_for_trt(engine, demo_tiny_dir):
    text = engine.tokenize("Hello there, this is a test.")
    params = SamplingParams(top_k=1, repetition_penalty=1.0, temperature=1.0, max_new_tokens=12, seed=1)
    got = asyncio.run(collect(engine.generate("default", text, params)))
    sd, cfg = load_t3_state_dict(demo_tiny_dir)
    model = create_t3_for_trt(sd, compute_voice_prefix(sd, demo_tiny_dir, "default", cfg), cfg)
    want = model.generate(text, max_new_tokens=12, top_k=1, repetition_penalty=1.0, temperature=1.0)
    want = [t for t in want if t < 6561]
    assert got == want and len(got) > 0
    assert engine.stats()["active"] == 0 and engine.stats()["finished"] == 1


def test_request_fields(engine):
    req = engine.request_for("default", [5, 6, 7], SamplingParams(temperature=0.0, seed=3, max_new_tokens=10))
    m = engine.meta
    assert req.input_token_ids[:m["prefix_len"]] == list(range(m["vocab_size"], m["vocab_size"] + m["prefix_len"]))
    assert req.input_token_ids[m["prefix_len"]:] == [5, 6, 7, 50276 + 6561]
    assert req.end_id == 50276 + 6562 and req.streaming and req.output_config.exclude_input_from_output
    assert req.prompt_tuning_config.embedding_table.shape == (376, 64)
    assert req.prompt_tuning_config.input_token_extra_ids[:376] == [1] * 376
    assert req.sampling_config.temperature == 1.0 and req.sampling_config.seed == 3
    assert req.embedding_bias.shape == (56839,) and float(req.embedding_bias[:50276].max()) <= -1e8


def test_bad_requests_fail_clearly(engine):
    with pytest.raises(ValueError, match="unknown voice 'nobody'"):
        engine.generate("nobody", [1], SamplingParams())
    with pytest.raises(ValueError, match="out of range"):
        engine.generate("default", [50276], SamplingParams())
    with pytest.raises(TextError, match="too long"):
        engine.generate("default", [1] * 65, SamplingParams())
    with pytest.raises(ValueError, match="top_k=2000"):
        engine.generate("default", [1], SamplingParams(top_k=2000, max_new_tokens=5))
    req = engine.request_for("default", [1], SamplingParams(top_p=0.0, max_new_tokens=5))
    assert (req.sampling_config.top_k, req.sampling_config.top_p) == (1, 1.0)
    with pytest.raises(ValueError, match="exceeds the engine's 40"):
        engine.generate("default", [1], SamplingParams(max_new_tokens=41))


def test_cancel_frees_the_request(engine):
    engine.executor.delay = 0.05

    async def run():
        stream = engine.generate("default", [1, 2, 3], SamplingParams(max_new_tokens=40, top_k=0, seed=2))
        first = await stream.__anext__()
        await stream.aclose()
        return first
    first = asyncio.run(run())
    assert first and all(0 <= t < 6561 for t in first)
    assert engine.stats()["active"] == 0 and engine.stats()["cancelled"] == 1
    assert engine.executor.cancelled


def test_executor_error_reaches_the_stream(engine):
    engine.executor.fail_next = "out of KV cache blocks"
    with pytest.raises(RuntimeError, match="out of KV cache blocks"):
        asyncio.run(collect(engine.generate("default", [1, 2], SamplingParams(max_new_tokens=5))))
    assert engine.stats()["active"] == 0
