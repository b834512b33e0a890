"""Build the vocoder engine a VocoderServiceConfig asks for: S3Gen streaming sessions behind VocoderEngine."""

from __future__ import annotations

import logging
import os

import torch

from tts_common.config import ConfigError
from vocoder_service.engine.engine import VocoderEngine

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def s3gen_engine(model, voices: dict, stream_config=None) -> VocoderEngine:
    """A VocoderEngine over ``StreamingSession``s of ``model`` (an S3GenModel) for ``voices`` (name -> VoiceCond).

    The voice named ``default`` (the model folder's conds.pt) comes first. A session without a seed
    draws a random one, so its noise differs run to run (as upstream's does)."""
    from vocoder_service.s3gen import StreamingSession

    names = sorted(voices, key=lambda n: (n != "default", n))

    def open_backend(voice: str, seed: int | None):
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        return _TorchSession(StreamingSession(model, voices[voice], seed=seed, config=stream_config))

    return VocoderEngine(open_backend, names)


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

    def close(self):
        self.session.close()


def load_engine(cfg) -> VocoderEngine:
    """``cfg.engine == "pytorch"``: our S3Gen modules from ``cfg.model_dir`` on ``cfg.device``."""
    if cfg.engine != "pytorch":
        raise ConfigError(f"engine={cfg.engine} is not available in this installation's vocoder service; use --engine pytorch")
    from vocoder_service.s3gen.loading import load_vocoder

    device = resolve_device(cfg.device)
    model, voices = load_vocoder(cfg.model_dir, cfg.voices_dir, device=device)
    engine = s3gen_engine(model, voices)
    log.info("vocoder engine ready", extra={"engine": "pytorch", "device": str(device), "voices": engine.voices()})
    return engine
