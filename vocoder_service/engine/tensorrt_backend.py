"""Vocoder engine on TensorRT: serialized engines (``export.tensorrt_build``) behind ``VocoderEngine``.

Per graph: deserialize the ``.plan`` (``trt.Runtime.deserialize_cuda_engine``), create an
execution context, pick the optimisation profile whose min/max contain the call's shapes
(``set_optimization_profile_async``), set the input shapes (``set_input_shape``), bind device
buffers (``set_tensor_address``) and run ``execute_async_v3`` on a CUDA stream; outputs are
allocated from ``get_tensor_shape`` after the inputs are set. TensorRT ≥ 10 API (name-based I/O).

Buffers are torch tensors on ``device`` (CUDA in production). The streaming logic is the PyTorch
engine's ``StreamingSession`` over :class:`GraphS3Gen`, exactly as for onnxruntime.

``TTS_ENGINE=tensorrt TTS_ENGINE_DIR=<folder with flow_encoder.plan ... + vocoder_onnx.json>``.
Tested here only against a fake of the ``tensorrt`` module (no GPU): see docs/EXPORT.md.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from vocoder_service.engine.graph_s3gen import (GRAPHS, GraphS3Gen, config_for_engine_dir, load_graph_voices,
                                                load_small_weights)

log = logging.getLogger(__name__)


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dt not in table:
        raise TypeError(f"unsupported TensorRT tensor dtype {dt}")
    return table[dt]


class TensorRTGraph:
    """One engine: profile selection, shapes, buffers, ``execute_async_v3`` on a stream."""

    def __init__(self, trt, runtime, path: Path, device: torch.device):
        self.trt, self.path, self.device = trt, path, device
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (built for another GPU / TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.profile = -1
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _stream_handle(self) -> int:
        return self.stream.cuda_stream if self.stream is not None else 0

    def select_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Index of the first profile whose [min, max] contains every input shape."""
        for p in range(self.engine.num_optimization_profiles):
            ok = True
            for name, shape in shapes.items():
                lo, _, hi = self.engine.get_tensor_profile_shape(name, p)
                if len(lo) != len(shape) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                    ok = False
                    break
            if ok:
                return p
        ranges = {n: [tuple(self.engine.get_tensor_profile_shape(n, p)) for p in
                      range(self.engine.num_optimization_profiles)] for n in shapes}
        raise ValueError(f"{self.path.name}: input shapes {dict(shapes)} fit no optimisation profile {ranges}; "
                         f"rebuild the engine with larger profiles (export.tensorrt_build)")

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {sorted(missing)}")
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        profile = self.select_profile(shapes)
        handle = self._stream_handle()
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, handle)
            self.profile = profile
        keep = []
        for n in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device,
                                                                   _torch_dtype(self.trt, self.engine.get_tensor_dtype(n)))
            keep.append(t)
            if not self.context.set_input_shape(n, tuple(t.shape)):
                raise ValueError(f"{self.path.name}: TensorRT rejected shape {tuple(t.shape)} for {n}")
            self.context.set_tensor_address(n, t.data_ptr())
        outs = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            if any(s < 0 for s in shape):
                raise RuntimeError(f"{self.path.name}: output {n} shape {shape} unresolved after setting inputs")
            o = torch.empty(shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(n)), device=self.device)
            self.context.set_tensor_address(n, o.data_ptr())
            outs[n] = o
        if not self.context.execute_async_v3(handle):
            raise RuntimeError(f"{self.path.name}: execute_async_v3 failed")
        if self.stream is not None:
            self.stream.synchronize()
        del keep
        return outs[self.outputs[0]].float().cpu().numpy()


class TensorRTRunner:
    """The four engines; ``runner(name, feeds) -> first output`` like ``OnnxRunner``."""

    def __init__(self, engine_dir: str | Path, device: str | torch.device = "cuda", trt=None):
        if trt is None:
            import tensorrt as trt  # type: ignore[no-redef]
        self.trt = trt
        d = Path(engine_dir)
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.graphs = {}
        for name in GRAPHS:
            path = d / f"{name}.plan"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: build the engines with build_engines.sh first")
            self.graphs[name] = TensorRTGraph(trt, self.runtime, path, self.device)

    def __call__(self, name: str, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.graphs[name](feeds)


def load_tensorrt_model(engine_dir: str | Path, model_dir: str | Path, device: str = "cuda", trt=None) -> GraphS3Gen:
    cfg, _ = config_for_engine_dir(engine_dir)
    return GraphS3Gen(cfg, TensorRTRunner(engine_dir, device, trt), load_small_weights(model_dir))


def load_tensorrt_engine(cfg, trt=None):
    """``VocoderServiceConfig`` with ``engine=tensorrt`` → ``VocoderEngine`` (needs CUDA + tensorrt)."""
    from vocoder_service.engine.loader import engine_scheduling, s3gen_engine

    device = cfg.device if getattr(cfg, "device", "auto") not in ("auto", None) else "cuda"
    if trt is None and not torch.cuda.is_available():
        raise RuntimeError("engine=tensorrt needs a CUDA GPU; use --engine onnxruntime or pytorch on this machine")
    model = load_tensorrt_model(cfg.engine_dir, cfg.model_dir, device, trt)
    engine = s3gen_engine(model, load_graph_voices(cfg.model_dir, cfg.voices_dir), **engine_scheduling(cfg))
    log.info("vocoder engine ready", extra={"engine": "tensorrt", "device": str(device), "voices": engine.voices()})
    return engine


__all__ = ["TensorRTGraph", "TensorRTRunner", "load_tensorrt_model", "load_tensorrt_engine"]
