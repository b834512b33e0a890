"""S3Gen → ONNX: the vocoder's parts exactly as the streaming session calls them.

``vocoder_service.s3gen.streaming.stream_step`` calls four compute pieces; each becomes a graph
(the loops and stateful bits around them stay in the runtime, where they are cheap):

==================  ===========================================  ====================================
graph               inputs → outputs                             PyTorch counterpart
==================  ===========================================  ====================================
``flow_encoder``    tokens (B, N) int64 → mu (B, 80, 2N)          ``encoder_proj(encoder(input_embedding(t)))ᵀ``
``flow_estimator``  x, mask, mu, t, r, spk, cond → v (B, 80, F)   ``flow.decoder.estimator`` (called twice:
                                                                  meanflow Euler, 2 steps, in the runtime)
``hift_f0``         mel (B, 80, F) → f0 (B, F)                    ``mel2wav.f0_predictor``
``hift_decoder``    mel (B, 80, F), source (B, 1, 480F) → audio   ``mel2wav.decode``
==================  ===========================================  ====================================

Split where control flow demands: the Euler loop (2 iterations, time grid), the harmonic source
(cumulative phase carried across chunks, seeded noise) and the cross-fade stay outside.
``torch.stft`` / ``torch.istft`` (no ONNX/TensorRT export) are rewritten in ``hift_decoder`` as a
convolution with a windowed DFT basis and a transposed convolution (overlap-add divided by the
window envelope): the same maths, checked against ``mel2wav.decode`` by the tests.

All axes that vary with the stream (batch, tokens, frames, samples) are dynamic. Each graph is
run under onnxruntime and compared with PyTorch at a shape different from the traced one.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GRAPHS = ("flow_encoder", "flow_estimator", "hift_f0", "hift_decoder")
ONNX_RTOL = 1e-3  # max |onnx - torch| / max |torch|, float32
OPSET = 17


class EncoderGraph(nn.Module):
    """tokens (B, N) int64 → mu (B, n_mels, ratio·N): embedding, conformer encoder, projection."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.flow.encoder_proj(self.flow.encoder(self.flow.input_embedding(tokens))).transpose(1, 2)


class EstimatorGraph(nn.Module):
    """The meanflow estimator: x, mu, cond (B, 80, F); mask (B, 1, F); t, r (B,); spk (B, 80)."""

    def __init__(self, estimator: nn.Module):
        super().__init__()
        self.estimator = estimator

    def forward(self, x, mask, mu, t, r, spk, cond):
        return self.estimator(x, mask, mu, t, r, spk, cond)


class F0Graph(nn.Module):
    """mel (B, 80, F) → F0 per frame (B, F) in Hz."""

    def __init__(self, hift: nn.Module):
        super().__init__()
        self.f0 = hift.f0_predictor

    def forward(self, mel):
        return self.f0(mel)


def _dft_angles(n_fft: int) -> torch.Tensor:
    """(n_fft//2 + 1, n_fft) float64: 2π·k·n / n_fft for the one-sided DFT bins k and samples n."""
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
    return 2 * math.pi * k * n / n_fft


class DFTSTFT(nn.Module):
    """``torch.stft(x, n_fft, hop, window, center=True, reflect pad, onesided)`` as a conv1d.

    x (B, L) → (B, n_fft + 2, L // hop + 1): real parts then imaginary parts, like
    ``cat([spec.real, spec.imag], 1)``.
    """

    def __init__(self, n_fft: int, hop: int, window: torch.Tensor):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        ang = _dft_angles(n_fft)
        w = window.double()
        basis = torch.cat([torch.cos(ang) * w, -torch.sin(ang) * w])  # (2·half, n_fft)
        self.register_buffer("basis", basis.float()[:, None, :], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x[:, None], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        return F.conv1d(x, self.basis, stride=self.hop)


class DFTISTFT(nn.Module):
    """``torch.istft(complex(re, im), n_fft, hop, window, center=True)`` as a transposed conv.

    re, im (B, n_fft//2 + 1, T) → audio (B, hop·(T-1)).
    """

    def __init__(self, n_fft: int, hop: int, window: torch.Tensor):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        half = n_fft // 2 + 1
        ang = _dft_angles(n_fft)
        c = torch.full((half, 1), 2.0, dtype=torch.float64)
        c[0] = 1.0
        c[-1] = 1.0 if n_fft % 2 == 0 else 2.0
        w = window.double()
        inv = torch.cat([c * torch.cos(ang) * w, -c * torch.sin(ang) * w]) / n_fft  # irfft then window
        self.register_buffer("basis", inv.float()[:, None, :], persistent=False)
        self.register_buffer("win_sq", (w ** 2).float()[None, None, :], persistent=False)

    def forward(self, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        spec = torch.cat([re, im], dim=1)  # (B, 2·half, T)
        frames = F.conv_transpose1d(spec, self.basis, stride=self.hop)  # (B, 1, hop·(T-1) + n_fft)
        ones = torch.ones_like(re[:, :1])  # (B, 1, T)
        env = F.conv_transpose1d(ones, self.win_sq, stride=self.hop)
        pad = self.n_fft // 2
        out = frames[:, 0, pad:-pad] / env[:, 0, pad:-pad]
        return out


class HiFTDecoderGraph(nn.Module):
    """mel (B, 80, F), excitation (B, 1, F·480) → audio (B, F·480): ``HiFTGenerator.decode``."""

    def __init__(self, hift: nn.Module):
        super().__init__()
        self.hift = hift
        self.stft = DFTSTFT(hift.n_fft, hift.hop, hift.stft_window)
        self.istft = DFTISTFT(hift.n_fft, hift.hop, hift.stft_window)

    def forward(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        re, im = self.hift.spectrum(mel, self.stft(source[:, 0]))
        limit = self.hift.cfg.audio_limit
        return self.istft(re, im).clamp(-limit, limit)


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]  # example inputs, in call order
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def graph_specs(model, batch: int = 1, n_tokens: int = 20, prompt_tokens: int = 10) -> list[GraphSpec]:
    """Example inputs for each graph (shapes as a streaming step uses them)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    n_mel = cfg.n_mels
    frames = cfg.token_mel_ratio * (prompt_tokens + n_tokens)
    tok = torch.randint(0, cfg.vocab_size, (batch, prompt_tokens + n_tokens), generator=g)
    x = torch.randn(batch, n_mel, frames, generator=g)
    est_in = {"x": x, "mask": torch.ones(batch, 1, frames), "mu": torch.randn(batch, n_mel, frames, generator=g),
              "t": torch.full((batch,), 0.0), "r": torch.full((batch,), 0.5),
              "spk": torch.randn(batch, n_mel, generator=g), "cond": torch.randn(batch, n_mel, frames, generator=g)}
    hframes = 2 * n_tokens
    mel = torch.randn(batch, n_mel, hframes, generator=g)
    src = torch.randn(batch, 1, hframes * cfg.hop_samples, generator=g) * 0.1
    hift = model.mel2wav
    return [
        GraphSpec("flow_encoder", EncoderGraph(model.flow), {"tokens": tok}, ["mu"],
                  {"tokens": {0: "batch", 1: "tokens"}, "mu": {0: "batch", 2: "frames"}}),
        GraphSpec("flow_estimator", EstimatorGraph(model.flow.decoder.estimator), est_in, ["velocity"],
                  {**{k: {0: "batch", 2: "frames"} for k in ("x", "mask", "mu", "cond")},
                   "t": {0: "batch"}, "r": {0: "batch"}, "spk": {0: "batch"}, "velocity": {0: "batch", 2: "frames"}}),
        GraphSpec("hift_f0", F0Graph(hift), {"mel": mel}, ["f0"],
                  {"mel": {0: "batch", 2: "frames"}, "f0": {0: "batch", 1: "frames"}}),
        GraphSpec("hift_decoder", HiFTDecoderGraph(hift), {"mel": mel, "source": src}, ["audio"],
                  {"mel": {0: "batch", 2: "frames"}, "source": {0: "batch", 2: "samples"},
                   "audio": {0: "batch", 1: "samples"}}),
    ]


def export_graph(spec: GraphSpec, path: Path) -> Path:
    """Trace ``spec.module`` to ONNX at ``path`` (float32, dynamic axes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):  # oneDNN re-plans every new shape: slow on CPU
        torch.onnx.export(spec.module.eval(), tuple(spec.inputs.values()), str(path),
                          input_names=list(spec.inputs), output_names=spec.outputs,
                          dynamic_axes=spec.dynamic_axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    return path


def ort_session(path: str | Path, providers: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def check_graph(spec: GraphSpec, path: Path, other_inputs: dict[str, torch.Tensor]) -> tuple[bool, str, float]:
    """Run the graph under onnxruntime on ``other_inputs`` (new shapes) vs PyTorch; rel error."""
    sess = ort_session(path)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        ref = spec.module(*other_inputs.values()).float().numpy()
    got = sess.run(None, {k: v.numpy() for k, v in other_inputs.items()})[0]
    if got.shape != ref.shape:
        return False, f"shape {got.shape} != {ref.shape}", float("inf")
    rel = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in other_inputs.items())
    return rel <= ONNX_RTOL, f"onnxruntime vs torch max rel err {rel:.1e} (tol {ONNX_RTOL:.0e}) at {shapes}", rel


def export_vocoder(model_dir: str | Path, output_dir: str | Path, voice: str = "default", preset: str | None = None,
                   check: bool = True, batch_sizes: tuple[int, ...] = (1, 4, 16),
                   chunk_tokens: tuple[int, ...] | None = None) -> dict:
    """Export the four graphs (+ TensorRT build scripts) for the S3Gen of ``model_dir``.

    Returns ``{"paths": {...}, "validation": [{"name", "passed", "detail"}...]}``.
    """
    from vocoder_service.s3gen.loading import load_vocoder
    from export.tensorrt_build import write_tensorrt_scripts

    model, voices = load_vocoder(model_dir)
    model.mel2wav.fold_weight_norm()
    if voice not in voices:
        raise ValueError(f"voice {voice!r} not found (voices: {sorted(voices)})")
    prompt_tokens = voices[voice].n_prompt_tokens
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    validation = []
    specs = graph_specs(model, batch=1, n_tokens=20, prompt_tokens=min(prompt_tokens, 10))
    others = graph_specs(model, batch=2, n_tokens=13, prompt_tokens=min(prompt_tokens, 10) + 3)
    for spec, other in zip(specs, others):
        t0 = time.perf_counter()
        p = export_graph(spec, out / f"{spec.name}.onnx")
        paths[spec.name] = p
        if check:
            ok, detail, _ = check_graph(spec, p, other.inputs)
            validation.append({"name": f"onnx {spec.name}", "passed": ok,
                               "detail": f"{detail} ({time.perf_counter() - t0:.1f}s)"})
    meta = {"format": "s3gen-onnx/1", "graphs": {n: f"{n}.onnx" for n in GRAPHS}, "opset": OPSET,
            "n_mels": model.cfg.n_mels, "token_mel_ratio": model.cfg.token_mel_ratio,
            "hop_samples": model.cfg.hop_samples, "n_flow_steps": model.cfg.n_flow_steps,
            "pre_lookahead": model.cfg.pre_lookahead, "prompt_tokens": prompt_tokens,
            "source_model_dir": str(Path(model_dir).resolve()), "voice": voice}
    (out / "vocoder_onnx.json").write_text(json.dumps(meta, indent=2))
    paths["meta"] = out / "vocoder_onnx.json"
    for k, p in write_tensorrt_scripts(out, model.cfg, prompt_tokens, batch_sizes=batch_sizes,
                                       chunk_tokens=chunk_tokens).items():
        paths[f"tensorrt.{k}"] = p
    return {"paths": paths, "validation": validation}


# ---------------------------------------------------------------------- CLI
def _cmd(a: argparse.Namespace) -> int:
    res = export_vocoder(a.model_dir, a.output_dir, a.voice, check=not a.no_check)
    for k, v in res["paths"].items():
        print(f"{k}\t{v}")
    for v in res["validation"]:
        print(f"{'PASS' if v['passed'] else 'FAIL'}  {v['name']}: {v['detail']}")
    return 0 if all(v["passed"] for v in res["validation"]) else 1


def register(subparsers) -> None:
    """``tts-export onnx``."""
    p = subparsers.add_parser("onnx", help="S3Gen → ONNX graphs (checked under onnxruntime) + TensorRT scripts")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--voice", default="default", help="voice whose prompt length sizes the profiles")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch comparison")
    p.set_defaults(func=_cmd)


__all__ = ["GRAPHS", "EncoderGraph", "EstimatorGraph", "F0Graph", "HiFTDecoderGraph", "DFTSTFT", "DFTISTFT",
           "graph_specs", "export_graph", "check_graph", "export_vocoder", "ort_session", "register"]
