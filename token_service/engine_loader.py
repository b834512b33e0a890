"""Build the token engine a TokenServiceConfig asks for (the server's only tie to engine construction)."""

from __future__ import annotations

import logging

from tts_common.config import ConfigError
from tts_common.gpu_memory import limit_cuda_stack

log = logging.getLogger(__name__)


def load_engine(cfg):
    """``cfg.engine == "pytorch"``: the continuous-batching ``LLMEngine`` on ``cfg.device`` / ``cfg.dtype``
    with ``cfg.kv_slots`` KV slots (0 = ``cfg.max_streams``). ``trtllm`` needs the TensorRT-LLM runtime
    (GPU images only)."""
    if cfg.engine == "trtllm":
        try:
            from token_service.engine.trtllm import load_trtllm_engine  # GPU images only
        except ImportError as exc:
            raise ConfigError(f"engine=trtllm is not available in this installation ({exc}); use --engine pytorch") from None
        return load_trtllm_engine(cfg)
    from token_service.engine import EngineConfig, LLMEngine

    slots = cfg.kv_slots or cfg.max_streams
    stack = limit_cuda_stack(cfg.cuda_stack_bytes, cfg.device)  # before the model: the context's reservation
    if stack is not None:
        log.info("CUDA stack limit set", extra={"cuda_stack_bytes": stack})
    engine = LLMEngine(EngineConfig(
        model_dir=cfg.model_dir, voices_dir=cfg.voices_dir, device=cfg.device, dtype=cfg.dtype,
        max_slots=slots, max_seq_len=cfg.max_seq_len, default_max_new_tokens=cfg.max_new_tokens,
        compile=cfg.compile, kernels=cfg.t3_kernels, overlap_steps=cfg.t3_overlap_steps,
        overlap_depth=cfg.t3_overlap_depth, kv_first_group=cfg.kv_first_group, prefill_rows=cfg.prefill_rows))
    log.info("token engine ready", extra={"engine": "pytorch", "device": str(engine.device), "dtype": str(engine.dtype),
                                          "kv_slots": slots, "voices": engine.voices(),
                                          "compile": engine.compile_status,
                                          "t3_kernels": engine.kernels_status,
                                          "t3_overlap_steps": cfg.t3_overlap_steps,
                                          "t3_overlap_depth": cfg.t3_overlap_depth,
                                          "kv_first_group": cfg.kv_first_group, "prefill_rows": cfg.prefill_rows})
    return engine
