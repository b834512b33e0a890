"""S3Gen on exported graphs: the streaming session's model interface over ONNX / TensorRT runners.

``vocoder_service.s3gen.streaming.stream_step`` needs from its model: ``cfg``, ``device``,
``flow(tokens, prompt_feat, spk, noise, drop_tail_frames=)``, ``flow.speaker(embedding)``,
``mel2wav.f0_at_samples(mel)``, ``mel2wav.m_source(f0, rnd, cycles0)`` and
``mel2wav.decode(mel, source)``. :class:`GraphS3Gen` provides exactly these, with the four graphs
of ``export.s3gen_onnx`` (``flow_encoder``, ``flow_estimator``, ``hift_f0``, ``hift_decoder``)
doing the compute; the meanflow Euler loop (2 steps), the speaker projection (80×192 linear) and
the harmonic source (9→1 linear over sines; stateful across chunks) run in PyTorch on the host.
So the same ``StreamingSession`` code streams audio on PyTorch, onnxruntime or TensorRT.

A *runner* is any callable ``runner(name, {input: np.ndarray}) -> np.ndarray`` (one output).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from vocoder_service.s3gen.config import S3GenConfig
from vocoder_service.s3gen.hift import HarmonicSource

Runner = Callable[[str, Mapping[str, np.ndarray]], np.ndarray]
GRAPHS = ("flow_encoder", "flow_estimator", "hift_f0", "hift_decoder")


def _np(x: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy().astype(dtype, copy=False))


class GraphFlow:
    """``TokenToMel`` on graphs: encoder graph, then ``n_steps`` Euler steps of the estimator graph."""

    def __init__(self, cfg: S3GenConfig, run: Runner, spk_weight: torch.Tensor, spk_bias: torch.Tensor):
        self.cfg, self.run = cfg, run
        self.spk_weight, self.spk_bias = spk_weight.float(), spk_bias.float()

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """x-vector (B, spk_dim) → (B, n_mels): L2-normalise then project (as upstream)."""
        return F.linear(F.normalize(embedding.float().cpu(), dim=1), self.spk_weight, self.spk_bias)

    def __call__(self, tokens: torch.Tensor, prompt_feat: torch.Tensor, spk: torch.Tensor, noise: torch.Tensor,
                 drop_tail_frames: int = 0, n_steps: int | None = None) -> torch.Tensor:
        """Same contract as ``TokenToMel.forward``: → mel (B, n_mels, F - Fp)."""
        mu = torch.from_numpy(self.run("flow_encoder", {"tokens": _np(tokens, np.int64)}))
        if drop_tail_frames:
            mu = mu[:, :, :-drop_tail_frames]
        B, m, Fr = mu.shape
        Fp = prompt_feat.size(1)
        cond = torch.zeros_like(mu)
        cond[:, :, :Fp] = prompt_feat.float().cpu().transpose(1, 2)
        mask = torch.ones(B, 1, Fr)
        n = n_steps or self.cfg.n_flow_steps
        grid = torch.linspace(0, 1, n + 1)
        x = noise[:, :, :Fr].float().cpu()
        fixed = {"mask": _np(mask), "mu": _np(mu), "spk": _np(spk), "cond": _np(cond)}
        for i in range(n):
            t, r = grid[i].expand(B), grid[i + 1].expand(B)
            v = self.run("flow_estimator", {"x": _np(x), **fixed, "t": _np(t), "r": _np(r)})
            x = x + (grid[i + 1] - grid[i]) * torch.from_numpy(v)
        return x[:, :, Fp:]


class GraphHiFT:
    """``HiFTGenerator`` on graphs (``hift_f0``, ``hift_decoder``); the source stays in PyTorch."""

    def __init__(self, cfg: S3GenConfig, run: Runner, m_source: HarmonicSource):
        self.cfg, self.run, self.m_source = cfg, run, m_source
        self.frame_samples = cfg.hop_samples

    def f0_at_samples(self, mel: torch.Tensor) -> torch.Tensor:
        f0 = torch.from_numpy(self.run("hift_f0", {"mel": _np(mel)}))
        return f0.repeat_interleave(self.frame_samples, dim=1)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run("hift_decoder", {"mel": _np(mel), "source": _np(source)}))


class GraphS3Gen:
    """What ``stream_step`` / ``StreamingSession`` need, computed by graph runners."""

    def __init__(self, cfg: S3GenConfig, run: Runner, small_weights: Mapping[str, torch.Tensor]):
        self.cfg = cfg
        self.device = torch.device("cpu")  # host-side tensors; the runner moves data to its device
        self.flow = GraphFlow(cfg, run, small_weights["flow.spk_embed_affine_layer.weight"],
                              small_weights["flow.spk_embed_affine_layer.bias"])
        src = HarmonicSource(cfg)
        src.l_linear.weight.data.copy_(small_weights["mel2wav.m_source.l_linear.weight"])
        src.l_linear.bias.data.copy_(small_weights["mel2wav.m_source.l_linear.bias"])
        self.mel2wav = GraphHiFT(cfg, run, src.eval())


SMALL_KEYS = ("flow.spk_embed_affine_layer.weight", "flow.spk_embed_affine_layer.bias",
              "mel2wav.m_source.l_linear.weight", "mel2wav.m_source.l_linear.bias")


def load_small_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The few host-side S3Gen weights, read from ``s3gen_meanflow.safetensors`` without loading the rest."""
    path = Path(model_dir) / "s3gen_meanflow.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the vocoder engine needs the model folder's S3Gen weights)")
    with safe_open(str(path), framework="pt") as f:
        missing = [k for k in SMALL_KEYS if k not in f.keys()]
        if missing:
            raise ValueError(f"{path}: missing {missing}")
        return {k: f.get_tensor(k).float() for k in SMALL_KEYS}


def config_for_engine_dir(engine_dir: str | Path) -> tuple[S3GenConfig, dict]:
    """Read ``vocoder_onnx.json`` (written by the exporter, copied next to TensorRT engines)."""
    meta_path = Path(engine_dir) / "vocoder_onnx.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: is {engine_dir} an exported vocoder folder?")
    meta = json.loads(meta_path.read_text())
    base = S3GenConfig()
    if (meta["n_mels"], meta["hop_samples"], meta["token_mel_ratio"]) != (base.n_mels, base.hop_samples,
                                                                          base.token_mel_ratio):
        raise ValueError(f"{meta_path}: mel/hop/ratio {meta['n_mels']}/{meta['hop_samples']}/{meta['token_mel_ratio']}"
                         f" differ from S3Gen's {base.n_mels}/{base.hop_samples}/{base.token_mel_ratio}")
    return base, meta


def load_graph_voices(model_dir: str | Path, voices_dir: str | Path | None = None) -> dict:
    """Voice name → ``VoiceCond`` (the S3Gen part of each ``conds.pt``)."""
    from tts_common.conds import load_voices
    from vocoder_service.s3gen.model import VoiceCond

    voices = load_voices(model_dir, voices_dir, prompt_len=None)
    return {name: VoiceCond.from_gen(v.gen.as_dict()) for name, v in voices.items()}


__all__ = ["GraphS3Gen", "GraphFlow", "GraphHiFT", "load_small_weights", "config_for_engine_dir",
           "load_graph_voices", "GRAPHS", "Runner"]
