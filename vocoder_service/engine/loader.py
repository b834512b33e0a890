"""Build the vocoder engine a VocoderServiceConfig asks for: S3Gen streaming sessions behind VocoderEngine."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from tts_common.config import ConfigError
from tts_common.gpu_memory import limit_cuda_stack
from vocoder_service.engine.engine import VocoderEngine

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def s3gen_engine(model, voices: dict, stream_config=None, batched: bool = True, max_batch: int = 64,
                 hold_pushes: bool = True, **scheduling) -> VocoderEngine:
    """A VocoderEngine over ``StreamingSession``s of ``model`` (an S3GenModel) for ``voices`` (name -> VoiceCond).

    The voice named ``default`` (the model folder's conds.pt) comes first. A session without a seed
    draws a random one, so its noise differs run to run (as upstream's does)."""
    from vocoder_service.s3gen import StreamingSession

    names = sorted(voices, key=lambda n: (n != "default", n))

    def open_backend(voice: str, seed: int | None):
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        return _TorchSession(StreamingSession(model, voices[voice], seed=seed, config=stream_config))

    return VocoderEngine(open_backend, names, step_batch=step_batch_s3gen() if batched else None,
                         finish_batch=finish_batch_s3gen() if batched else None, max_batch=max_batch,
                         hold_pushes=hold_pushes, **scheduling)


def engine_scheduling(cfg) -> dict:
    """The ``VocoderEngine`` step-selection arguments of a VocoderServiceConfig (deadline-aware steps)."""
    from vocoder_service.engine.engine import MAX_DEFER_S, URGENT_FILL, URGENT_SLACK_S

    return {"urgent_slack_s": float(getattr(cfg, "vocoder_urgent_slack_s", URGENT_SLACK_S)),
            "urgent_fill": int(getattr(cfg, "vocoder_urgent_fill", URGENT_FILL)),
            "max_defer_s": float(getattr(cfg, "vocoder_max_defer_ms", MAX_DEFER_S * 1000)) / 1000}


def step_batch_s3gen():
    """The batched push of the S3Gen streaming module, adapted to the engine, or None if it has none.

    ``vocoder_service.s3gen.streaming.push_batch(sessions, token_lists) -> list[audio]`` (owned by the
    streaming module, which alone knows its chunk schedule) runs the ready chunks of several sessions
    as one ``stream_step`` per group of equal shapes; each session gets what ``push`` would return.
    """
    try:
        from vocoder_service.s3gen.streaming import push_batch
    except ImportError:
        return None

    def step(backends: list, token_lists: list[list[int]]) -> list[np.ndarray]:
        with torch.inference_mode():
            outs = push_batch([b.session for b in backends], [list(t) for t in token_lists])
        return [o.float().cpu().numpy() for o in outs]

    return step


def finish_batch_s3gen():
    """``vocoder_service.s3gen.streaming.finish_batch`` adapted to the engine (final steps of equal
    remaining length run as one ``stream_step``)."""
    from vocoder_service.s3gen.streaming import finish_batch

    def finish(backends: list) -> list[np.ndarray]:
        with torch.inference_mode():
            outs = finish_batch([b.session for b in backends])
        return [o.float().cpu().numpy() for o in outs]

    return finish


class _TorchSession:
    """Adapts StreamingSession (torch tensors, grad off) to the engine's numpy backend protocol."""

    def __init__(self, session):
        self.session = session

    def push(self, token_ids):
        with torch.inference_mode():
            return self.session.push(list(token_ids)).float().cpu().numpy()

    def finish(self):
        with torch.inference_mode():
            return self.session.finish().float().cpu().numpy()

    def tokens_needed(self) -> int:
        return self.session.tokens_needed()

    def close(self):
        self.session.close()


def load_engine(cfg) -> VocoderEngine:
    """``pytorch``: our S3Gen modules from ``cfg.model_dir`` on ``cfg.device``; ``onnxruntime`` /
    ``tensorrt``: the exported graphs in ``cfg.engine_dir`` (``onnx_backend`` / ``tensorrt_backend``)."""
    if cfg.engine in ("onnxruntime", "tensorrt"):
        try:
            if cfg.engine == "onnxruntime":
                from vocoder_service.engine.onnx_backend import load_onnx_engine as load
            else:
                from vocoder_service.engine.tensorrt_backend import load_tensorrt_engine as load
        except ImportError as exc:
            raise ConfigError(f"engine={cfg.engine} is not available in this installation ({exc}); "
                              f"use --engine pytorch") from None
        return load(cfg)
    if cfg.engine != "pytorch":
        raise ConfigError(f"unknown vocoder engine {cfg.engine!r}")
    from vocoder_service.s3gen.loading import load_vocoder

    from vocoder_service.s3gen.accel import parse_dtype, prepare_s3gen

    device = resolve_device(cfg.device)
    stack = limit_cuda_stack(int(getattr(cfg, "cuda_stack_bytes", 0)), str(device))
    if stack is not None:
        log.info("CUDA stack limit set", extra={"cuda_stack_bytes": stack})
    dtype = getattr(cfg, "dtype", "auto")
    graphs = bool(getattr(cfg, "cuda_graphs", False))
    try:
        parse_dtype(dtype)
    except ValueError as exc:
        raise ConfigError(f"{exc} (--dtype / TTS_DTYPE)") from None
    if graphs and device.type != "cuda":
        raise ConfigError(f"cuda_graphs needs a CUDA device, the vocoder runs on {device} (--cuda-graphs / TTS_CUDA_GRAPHS)")
    model, voices = load_vocoder(cfg.model_dir, cfg.voices_dir, device=device)
    graph_batch = int(getattr(cfg, "graph_batch", 32))
    try:
        prepare_s3gen(model, dtype=dtype, cuda_graphs=graphs, graph_batch=graph_batch)
    except ValueError as exc:
        raise ConfigError(f"{exc} (--graph-batch / TTS_GRAPH_BATCH)") from None
    from vocoder_service.s3gen.streaming import StreamConfig

    stream_config = StreamConfig(pad_windows=bool(getattr(cfg, "pad_flow_windows", True)),
                                 noise_on_host=bool(getattr(cfg, "noise_on_host", False)),
                                 chunk_tokens=int(getattr(cfg, "chunk_tokens", 25)))
    engine = s3gen_engine(model, voices, stream_config=stream_config, max_batch=int(getattr(cfg, "max_batch", 64)),
                          hold_pushes=bool(getattr(cfg, "hold_pushes", True)), **engine_scheduling(cfg))
    if graphs:  # capture the chunk shapes of the default voice now, not on the first streams
        from vocoder_service.s3gen.accel import warm_up_streaming

        t0 = time.perf_counter()
        warm_up_streaming(model, voices[engine.default_voice], config=stream_config,
                          batch_sizes=model.graphs.flow.batch_buckets)
        torch.cuda.empty_cache()  # the warm-up runs' blocks; the graphs keep their own pool
        log.info("vocoder CUDA graphs captured", extra={"seconds": round(time.perf_counter() - t0, 1),
                                                         "graphs": model.graphs.stats(),
                                                         "gpu_reserved_GB": round(torch.cuda.memory_reserved() / 1e9, 2)})
    log.info("vocoder engine ready", extra={"engine": "pytorch", "device": str(device), "voices": engine.voices(),
                                            "dtype": str(parse_dtype(dtype)), "cuda_graphs": graphs})
    return engine
