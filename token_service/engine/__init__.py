"""The token engine (continuous batching over a static KV cache); see ``llm_engine``."""
from ..t3.config import S3GEN_SIL, SPEECH_VOCAB_VALID, START_SPEECH, STOP_SPEECH
from ..t3.generate import silence_tail
from ..t3.sampling import SamplingParams
from ..t3.text import TextError
from .llm_engine import EngineConfig, LLMEngine
from .scheduler import EngineOverloaded

__all__ = ["EngineConfig", "LLMEngine", "EngineOverloaded", "SamplingParams", "TextError", "S3GEN_SIL",
           "SPEECH_VOCAB_VALID", "START_SPEECH", "STOP_SPEECH", "silence_tail"]
