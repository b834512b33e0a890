"""T3 hyper-parameters: the three presets and inference from a state dict.

Turbo is GPT-2 medium (24 layers × 1024, 16 heads), Nano is GPT-2 small (12 × 768, 12 heads),
``tiny`` keeps the architecture and vocabularies with small widths for fast tests (upstream
cannot load it). Numbers follow upstream ``chatterbox-tts`` 0.1.7 ``ChatterboxTurboTTS.from_local``
(``T3Config`` + ``GPT2_medium`` config): layer-norm eps 1e-5, ``gelu_new`` activation,
8196 learned positions, text vocab 50276, speech vocab 6563, 375 prompt speech tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping

import torch

START_SPEECH = 6561  # start-of-speech token (fed after the text)
STOP_SPEECH = 6562  # stop-of-speech token (ends generation, never emitted)
SPEECH_VOCAB_VALID = 6561  # ids >= this are not speech and are dropped from the output
S3GEN_SIL = 4299  # silence token; the service appends 3 per utterance, like upstream's generate


@dataclass(frozen=True)
class T3Config:
    """Shape of a T3 model. ``weights_file`` is the file name in the model folder."""

    name: str = "turbo"
    n_layer: int = 24
    n_embd: int = 1024
    n_head: int = 16
    n_positions: int = 8196
    layer_norm_eps: float = 1e-5
    text_vocab_size: int = 50276
    speech_vocab_size: int = 6563
    speaker_embed_size: int = 256
    prompt_len: int = 375  # prompt speech tokens in the voice prefix
    weights_file: str = "t3_turbo_v1.safetensors"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def prefix_len(self) -> int:
        """Voice-prefix length: 1 speaker projection + ``prompt_len`` prompt speech embeddings."""
        return 1 + self.prompt_len

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"T3Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @staticmethod
    def preset(name: str) -> "T3Config":
        """``turbo`` | ``nano`` | ``tiny``; anything else raises ``ValueError`` naming the choices."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown T3 preset {name!r}; choose one of {sorted(PRESETS)}") from None

    @staticmethod
    def from_state_dict(sd: Mapping[str, torch.Tensor], n_head: int | None = None,
                        name: str | None = None) -> "T3Config":
        """Infer the shape from a state dict with upstream's keys.

        The head count is not visible in the weights: pass ``n_head``, else it is taken from the
        preset with the same width (1024 → 16, 768 → 12, 64 → 4), else ``n_embd // 64``.
        """
        for key in ("tfmr.wpe.weight", "text_emb.weight", "speech_emb.weight", "cond_enc.spkr_enc.weight"):
            if key not in sd:
                raise ValueError(f"T3 state dict has no {key!r} (is this a T3 checkpoint?)")
        n_positions, n_embd = sd["tfmr.wpe.weight"].shape
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"tfmr\.h\.(\d+)\.", k))}
        if not layers or layers != set(range(len(layers))):
            raise ValueError(f"T3 state dict: transformer layers tfmr.h.* are missing or not contiguous: {sorted(layers)}")
        base = next((p for p in PRESETS.values() if p.n_embd == n_embd), None)
        if n_head is None:
            n_head = base.n_head if base is not None else max(1, n_embd // 64)
        if name is None:
            name = base.name if base is not None and base.n_layer == len(layers) else "custom"
        prompt_len = base.prompt_len if base is not None else 375
        weights_file = base.weights_file if base is not None else "t3_turbo_v1.safetensors"
        return T3Config(
            name=name,
            n_layer=len(layers),
            n_embd=int(n_embd),
            n_head=int(n_head),
            n_positions=int(n_positions),
            text_vocab_size=int(sd["text_emb.weight"].shape[0]),
            speech_vocab_size=int(sd["speech_emb.weight"].shape[0]),
            speaker_embed_size=int(sd["cond_enc.spkr_enc.weight"].shape[1]),
            prompt_len=prompt_len,
            weights_file=weights_file,
        )


PRESETS: dict[str, T3Config] = {
    "turbo": T3Config(),
    "nano": T3Config(name="nano", n_layer=12, n_embd=768, n_head=12, weights_file="t3_nano_v1.safetensors"),
    "tiny": T3Config(name="tiny", n_layer=2, n_embd=64, n_head=4),
}

__all__ = ["T3Config", "PRESETS", "START_SPEECH", "STOP_SPEECH", "SPEECH_VOCAB_VALID", "S3GEN_SIL", "replace"]
