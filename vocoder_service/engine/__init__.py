"""The vocoder engine the server calls: async streaming sessions over S3Gen (see engine.py)."""

from vocoder_service.engine.engine import (
    SAMPLE_RATE,
    SAMPLES_PER_TOKEN,
    SPEECH_VOCAB_SIZE,
    SessionClosedError,
    UnknownVoiceError,
    VocoderEngine,
    VocoderSession,
)

__all__ = [
    "SAMPLE_RATE",
    "SAMPLES_PER_TOKEN",
    "SPEECH_VOCAB_SIZE",
    "SessionClosedError",
    "UnknownVoiceError",
    "VocoderEngine",
    "VocoderSession",
]
