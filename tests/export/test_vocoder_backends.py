"""Vocoder backends on exported graphs: onnxruntime for real, TensorRT against a fake ``tensorrt``."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from export.tensorrt_build import build_all_engines
from vocoder_service.engine.onnx_backend import load_onnx_engine, load_onnx_model, select_providers
from vocoder_service.engine.tensorrt_backend import load_tensorrt_engine, load_tensorrt_model
from vocoder_service.s3gen.loading import load_vocoder
from vocoder_service.s3gen.streaming import StreamingSession

sys.path.insert(0, str(Path(__file__).parent))
import fake_tensorrt  # noqa: E402

TOKENS = torch.randint(0, 6561, (57,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def onnx_dir(vocoder_export):
    return vocoder_export[0]


def stream(model, voice, seed=5) -> np.ndarray:
    s = StreamingSession(model, voice, seed=seed)
    parts = [s.push(TOKENS[:20]), s.push(TOKENS[20:45]), s.push(TOKENS[45:]), s.finish()]
    return torch.cat(parts).numpy()


@pytest.fixture(scope="module")
def torch_audio(demo_tiny_dir):
    model, voices = load_vocoder(demo_tiny_dir)
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN re-plans each new conv shape: 10x slower here
        return stream(model, voices["default"]), voices


def test_provider_order():
    assert select_providers(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]) == \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(["CPUExecutionProvider", "CUDAExecutionProvider"]) == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(["CUDAExecutionProvider"], device="cpu") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="none of"):
        select_providers(["OpenVINOExecutionProvider"])


def test_onnxruntime_streaming_equals_pytorch(onnx_dir, demo_tiny_dir, torch_audio):
    ref, voices = torch_audio
    got = stream(load_onnx_model(onnx_dir, demo_tiny_dir, "cpu"), voices["default"])
    assert got.shape == ref.shape == (960 * len(TOKENS),)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-3


def test_onnxruntime_engine_contract(onnx_dir, demo_tiny_dir):
    cfg = SimpleNamespace(engine_dir=str(onnx_dir), model_dir=str(demo_tiny_dir), voices_dir=None, device="cpu")
    engine = load_onnx_engine(cfg)
    assert "default" in engine.voices()

    async def run():
        s = engine.open_session("default", seed=1)
        a = await s.push(TOKENS[:30])
        b = await s.finish()
        s.close()
        return len(a) + len(b), engine.stats()
    n, stats = asyncio.run(run())
    assert n == 960 * 30 and stats["active_sessions"] == 0
    engine.shutdown()


def test_tensorrt_adapter_against_fake(onnx_dir, demo_tiny_dir, torch_audio, tmp_path):
    ref, voices = torch_audio
    engines = build_all_engines(onnx_dir, tmp_path, trt=fake_tensorrt)
    assert sorted(p.name for p in engines.values()) == ["flow_encoder.plan", "flow_estimator.plan",
                                                       "hift_decoder.plan", "hift_f0.plan"]
    import json
    plan = json.loads(engines["flow_estimator"].read_bytes())
    assert plan["fp16"] and plan["obey"] and plan["fp32_layers"]
    assert not json.loads(engines["hift_decoder"].read_bytes())["fp16"]
    fake_tensorrt.CALLS.clear()
    got = stream(load_tensorrt_model(tmp_path, demo_tiny_dir, "cpu", trt=fake_tensorrt), voices["default"])
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-3
    calls = [c[0] for c in fake_tensorrt.CALLS]
    assert calls.count("set_optimization_profile_async") == 4  # once per engine, then reused
    assert calls.count("execute_async_v3") > 8


def test_tensorrt_shapes_outside_profile_fail_clearly(onnx_dir, demo_tiny_dir, tmp_path):
    build_all_engines(onnx_dir, tmp_path, trt=fake_tensorrt)
    model = load_tensorrt_model(tmp_path, demo_tiny_dir, "cpu", trt=fake_tensorrt)
    with pytest.raises(ValueError, match="fit no optimisation profile"):
        model.mel2wav.run("hift_f0", {"mel": np.zeros((64, 80, 10), np.float32)})  # batch 64 > max 16
    cfg = SimpleNamespace(engine_dir=str(tmp_path), model_dir=str(demo_tiny_dir), voices_dir=None, device="cpu")
    engine = load_tensorrt_engine(cfg, trt=fake_tensorrt)
    assert "default" in engine.voices()
    engine.shutdown()
