"""``engine=trtllm``: the token engine on TensorRT-LLM (see :mod:`token_service.engine.trtllm_backend`)."""
from token_service.engine.trtllm_backend import TRTLLMEngine, load_trtllm_engine

__all__ = ["TRTLLMEngine", "load_trtllm_engine"]
