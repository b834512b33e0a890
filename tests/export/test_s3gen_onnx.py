"""S3Gen → ONNX: every graph under onnxruntime vs PyTorch (tiny preset), TensorRT profiles/scripts."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from export.s3gen_onnx import DFTISTFT, DFTSTFT, check_graph, graph_specs, ort_session
from export.tensorrt_build import FP16_GRAPHS, streaming_profiles
from vocoder_service.s3gen.config import S3GenConfig
from vocoder_service.s3gen.loading import load_vocoder
from vocoder_service.s3gen.streaming import StreamConfig


@pytest.fixture(scope="module")
def tiny_model(demo_tiny_dir):
    model, voices = load_vocoder(demo_tiny_dir)
    model.mel2wav.fold_weight_norm()
    return model, voices


def test_every_graph_matches_pytorch_under_onnxruntime(vocoder_export):
    out, res = vocoder_export
    names = [v["name"] for v in res["validation"]]
    assert names == ["onnx flow_encoder", "onnx flow_estimator", "onnx hift_f0", "onnx hift_decoder"]
    assert all(v["passed"] for v in res["validation"]), res["validation"]
    meta = json.loads((out / "vocoder_onnx.json").read_text())
    assert meta["hop_samples"] == 480 and meta["n_flow_steps"] == 2


def test_hift_decoder_graph_equals_model_decode(vocoder_export, tiny_model):
    """The ONNX decoder (DFT-as-conv STFT/iSTFT) against ``mel2wav.decode`` itself (torch.stft/istft)."""
    out, _ = vocoder_export
    model, _ = tiny_model
    g = torch.Generator().manual_seed(7)
    mel = torch.randn(3, 80, 17, generator=g)
    src = torch.randn(3, 1, 17 * 480, generator=g) * 0.1
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        ref = model.mel2wav.decode(mel, src).numpy()
    got = ort_session(out / "hift_decoder.onnx").run(None, {"mel": mel.numpy(), "source": src.numpy()})[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-3


def test_dft_stft_istft_equal_torch():
    win = torch.hann_window(16, periodic=True)
    x = torch.randn(2, 4800)
    spec = torch.stft(x, 16, 4, 16, window=win, return_complex=True)
    ours = DFTSTFT(16, 4, win)(x)
    torch.testing.assert_close(ours, torch.cat([spec.real, spec.imag], 1), rtol=1e-4, atol=1e-4)
    re, im = torch.randn(2, 9, 50), torch.randn(2, 9, 50)
    ref = torch.istft(torch.complex(re, im), 16, 4, 16, window=win)
    torch.testing.assert_close(DFTISTFT(16, 4, win)(re, im), ref, rtol=1e-4, atol=1e-4)


def test_graphs_fail_the_check_when_wrong(vocoder_export, tiny_model):
    """check_graph really compares: against a (slightly) different computation it fails."""
    out, _ = vocoder_export
    model, _ = tiny_model
    spec = graph_specs(model, 1, 8, 5)[2]

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, mel):
            return self.inner(mel) * 1.01

    spec.module = Scaled(spec.module)
    ok, detail, rel = check_graph(spec, out / "hift_f0.onnx", spec.inputs)
    assert not ok and rel > 1e-3, detail


def test_streaming_profiles_cover_session_shapes():
    cfg, st = S3GenConfig(), StreamConfig()
    p = streaming_profiles(cfg, prompt_tokens=250, stream=st, batch_sizes=(1, 8, 32))
    lo, opt, hi = p["flow_encoder"].shapes["tokens"]
    assert lo == (1, 251) and opt == (8, 250 + 50 + 25 + 3) and hi == (32, 250 + 50 + 25 + 3)
    lo, opt, hi = p["flow_estimator"].shapes["x"]
    assert opt == (8, 80, 2 * (250 + 50 + 25)) and hi == (32, 80, 2 * (250 + 50 + 25 + 3))
    lo, opt, hi = p["hift_decoder"].shapes["source"]
    assert opt[2] == 480 * (8 + 2 + 50) and lo == (1, 1, 480)
    with pytest.raises(ValueError, match="batch sizes"):
        streaming_profiles(cfg, 250, st, batch_sizes=(0,))


def test_trtexec_script(vocoder_export):
    out, res = vocoder_export
    script = (out / "build_engines.sh").read_text()
    assert subprocess.run(["bash", "-n", str(out / "build_engines.sh")]).returncode == 0
    lines = [l for l in script.splitlines() if l.startswith("trtexec")]
    assert len(lines) == 4
    for line in lines:
        name = line.split("--onnx=")[1].split(".onnx")[0].split("/")[-1]
        assert "--minShapes=" in line and "--optShapes=" in line and "--maxShapes=" in line
        assert ("--fp16" in line) == (name in FP16_GRAPHS)
    assert "--precisionConstraints=obey" in lines[1] and ":fp32" in lines[1]
    spec = json.loads((out / "tensorrt_profiles.json").read_text())
    assert spec["graphs"]["flow_estimator"]["fp32_layers"] and not spec["graphs"]["hift_decoder"]["fp16"]
