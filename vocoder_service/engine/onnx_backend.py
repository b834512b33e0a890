"""Vocoder engine on onnxruntime: the exported graphs (``export.s3gen_onnx``) behind ``VocoderEngine``.

Execution providers, first present wins: TensorRT EP → CUDA EP → CPU (``select_providers``).
The streaming logic is the PyTorch engine's own ``StreamingSession`` over :class:`GraphS3Gen`,
so chunking, noise, cross-fades and lengths are identical; only the four graphs run in onnxruntime.

``TTS_ENGINE=onnxruntime TTS_ENGINE_DIR=<folder with the .onnx files + vocoder_onnx.json>``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from vocoder_service.engine.graph_s3gen import (GRAPHS, GraphS3Gen, config_for_engine_dir, load_graph_voices,
                                                load_small_weights)

log = logging.getLogger(__name__)

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def select_providers(available: Sequence[str], device: str = "auto") -> list[str]:
    """Providers to use, in preference order, among ``available``; ``device="cpu"`` forces CPU."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    chosen = [p for p in PROVIDER_ORDER if p in available]
    if not chosen:
        raise RuntimeError(f"onnxruntime offers none of {PROVIDER_ORDER} (available: {list(available)})")
    return chosen


class OnnxRunner:
    """One ``InferenceSession`` per graph; ``runner(name, feeds) -> first output``."""

    def __init__(self, engine_dir: str | Path, device: str = "auto", threads: int = 0):
        import onnxruntime as ort

        d = Path(engine_dir)
        self.providers = select_providers(ort.get_available_providers(), device)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {}
        for name in GRAPHS:
            path = d / f"{name}.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: export the vocoder with `tts-export onnx` first")
            self.sessions[name] = ort.InferenceSession(str(path), opts, providers=self.providers)

    def __call__(self, name: str, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.sessions[name].run(None, dict(feeds))[0]


def load_onnx_model(engine_dir: str | Path, model_dir: str | Path, device: str = "auto") -> GraphS3Gen:
    cfg, _ = config_for_engine_dir(engine_dir)
    return GraphS3Gen(cfg, OnnxRunner(engine_dir, device), load_small_weights(model_dir))


def load_onnx_engine(cfg):
    """``VocoderServiceConfig`` with ``engine=onnxruntime`` → ``VocoderEngine``."""
    from vocoder_service.engine.loader import engine_scheduling, s3gen_engine

    model = load_onnx_model(cfg.engine_dir, cfg.model_dir, getattr(cfg, "device", "auto"))
    engine = s3gen_engine(model, load_graph_voices(cfg.model_dir, cfg.voices_dir), **engine_scheduling(cfg))
    log.info("vocoder engine ready", extra={"engine": "onnxruntime", "providers": model.mel2wav.run.providers,
                                            "voices": engine.voices()})
    return engine


__all__ = ["select_providers", "OnnxRunner", "load_onnx_model", "load_onnx_engine", "PROVIDER_ORDER"]
