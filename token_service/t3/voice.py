"""The voice prefix: conditioning embeddings and their keys/values, computed once per voice.

Upstream's ``T3.prepare_conditioning`` for Turbo (no perceiver, no emotion, no CLAP) is
``cat([spkr_enc(speaker_emb)[:, None], speech_emb(prompt_tokens)], dim=1)``: 1 + 375 rows of width C
(376 × 1024 for Turbo). Those rows always sit at positions ``0 .. P-1`` of every sequence of that
voice, so their keys/values are the same for every request: :func:`build_voice_prefix` computes
them once and the engine copies them into a sequence's KV-cache slot when it starts
(:meth:`VoicePrefix.copy_into`), then prefills only ``[text | start-of-speech]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import T3Config
from .model import KVCache, T3Model


@dataclass
class VoiceConds:
    """What T3 needs from ``conds.pt``: ``speaker_emb`` ``(1, 256)`` float, ``prompt_tokens`` ``(1, P)`` int64."""

    speaker_emb: Tensor
    prompt_tokens: Tensor

    def validate(self, cfg: T3Config, where: str = "voice") -> "VoiceConds":
        se, pt = self.speaker_emb, self.prompt_tokens
        if not torch.is_tensor(se) or se.numel() != cfg.speaker_embed_size or not se.is_floating_point():
            raise ValueError(f"{where}: speaker_emb must be a float tensor of {cfg.speaker_embed_size} values, "
                             f"got {_describe(se)}")
        if not torch.is_tensor(pt) or pt.is_floating_point() or pt.reshape(-1).numel() != cfg.prompt_len:
            raise ValueError(f"{where}: cond_prompt_speech_tokens must be an integer tensor of shape "
                             f"(1, {cfg.prompt_len}), got {_describe(pt)}")
        if pt.numel() and (int(pt.min()) < 0 or int(pt.max()) >= cfg.speech_vocab_size):
            raise ValueError(f"{where}: cond_prompt_speech_tokens has ids outside [0, {cfg.speech_vocab_size})")
        return self


def _describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__


def load_voice_conds(path: str | Path) -> VoiceConds:
    """Read the T3 part of an upstream-format ``conds.pt`` (``{"t3": {...}, "gen": {...}}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"voice file not found: {path}")
    from tts_common.conds import load_voice  # validates the whole file, errors name file and field

    voice = load_voice(path, name=path.stem)
    return VoiceConds(speaker_emb=voice.t3.speaker_emb, prompt_tokens=voice.t3.cond_prompt_speech_tokens)


@dataclass
class VoicePrefix:
    """A voice's prefix embeddings ``(P, C)`` and per-layer keys/values ``(H, P, D)``."""

    name: str
    embeds: Tensor
    k: list[Tensor]
    v: list[Tensor]

    @property
    def length(self) -> int:
        return self.embeds.shape[0]

    def copy_into(self, cache: KVCache, slot: int) -> None:
        """Write the prefix keys/values at positions ``0 .. P-1`` of cache slot ``slot``."""
        P = self.length
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            cache.k[layer][slot, :, :P].copy_(k)
            cache.v[layer][slot, :, :P].copy_(v)


@torch.inference_mode()
def prefix_embeds(model: T3Model, conds: VoiceConds) -> Tensor:
    """Upstream's ``prepare_conditioning`` output for one voice: ``(1 + prompt_len, C)``."""
    cfg = model.cfg
    dev, dtype = model.speech_head.weight.device, model.speech_head.weight.dtype
    conds.validate(cfg)
    spk = model.speaker_embed(conds.speaker_emb.to(dev, dtype))  # (1, 1, C)
    prompt = model.speech_emb(conds.prompt_tokens.reshape(1, -1).to(dev, torch.long))  # (1, P, C)
    return torch.cat([spk, prompt], dim=1)[0]


@torch.inference_mode()
def build_voice_prefix(model: T3Model, conds: VoiceConds, name: str = "default") -> VoicePrefix:
    """Compute the prefix embeddings and run them once through the trunk to get their keys/values."""
    embeds = prefix_embeds(model, conds)
    P = embeds.shape[0]
    cache = KVCache(model.cfg, 1, P, device=embeds.device, dtype=embeds.dtype)
    positions = torch.arange(P, device=embeds.device)[None]
    model.forward_embeds(embeds[None], positions, cache.view(slice(0, 1)))
    return VoicePrefix(name=name, embeds=embeds, k=[k[0] for k in cache.k], v=[v[0] for v in cache.v])
