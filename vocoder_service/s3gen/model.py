"""S3GenModel: speech tokens + a voice -> 24 kHz audio (offline API).

Equal to upstream ``S3Gen(meanflow=True).inference(tokens, ref_dict=conds.gen, n_cfm_timesteps=2)``
given the same noise (see ``tests/vocoder_service/test_s3gen_parity.py``):

1. flow: prompt tokens + tokens -> encoder -> mu; prompt mel as condition; meanflow Euler 2 steps
   from noise (upstream draws fresh noise every call: its ``rand_noise`` buffer is ``None`` and
   ``flow_inference`` draws ``randn(1, 80, 2T)`` for the token frames and the decoder
   ``randn_like`` for the whole sequence; the prompt frames keep the latter);
2. HiFT on the token frames with a fresh random source (no cache);
3. the first 20 ms are silenced and the next 20 ms faded in (upstream's ``trim_fade``).

State-dict keys equal upstream's ``flow.*`` and ``mel2wav.*``; ``tokenizer.*`` and
``speaker_encoder.*`` (voice cloning from audio) are dropped explicitly by ``split_s3gen_state``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .config import S3GenConfig
from .flow import TokenToMel
from .hift import HiFTGenerator, SourceNoise
from .noise import PositionalNoise

SKIPPED_PREFIXES = ("tokenizer.", "speaker_encoder.")


def split_s3gen_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """-> (the ``flow.*`` / ``mel2wav.*`` entries, names of the skipped voice-cloning entries)."""
    kept = {k: v for k, v in state.items() if not k.startswith(SKIPPED_PREFIXES)}
    skipped = [k for k in state if k.startswith(SKIPPED_PREFIXES)]
    return kept, skipped


def trim_fade(n_samples: int, sample_rate: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Upstream's start fade: 20 ms of zeros then a 20 ms raised-cosine fade-in: (n,) gains."""
    n = sample_rate // 50
    fade = torch.zeros(2 * n)
    fade[n:] = (torch.cos(torch.linspace(math.pi, 0, n)) + 1) / 2
    out = torch.ones(max(n_samples, 2 * n))
    out[:2 * n] = fade
    return out[:n_samples].to(device=device, dtype=dtype)


@dataclass
class VoiceCond:
    """The vocoder part of a voice (``conds.pt`` ``gen``).

    prompt_token: (1, Tp) int64 speech tokens of the reference clip;
    prompt_feat: (1, Fp, n_mels) its mel (Fp = 2*Tp for well-formed conds);
    embedding: (1, spk_dim) x-vector.
    """

    prompt_token: torch.Tensor
    prompt_feat: torch.Tensor
    embedding: torch.Tensor

    @staticmethod
    def from_gen(gen: Any) -> "VoiceCond":
        """From a ``conds.pt`` ``gen`` dict or any object with those attributes (extra keys ignored)."""
        get = (lambda k: gen[k]) if isinstance(gen, Mapping) else (lambda k: getattr(gen, k))
        tok = torch.as_tensor(get("prompt_token")).long()
        feat = torch.as_tensor(get("prompt_feat")).float()
        emb = torch.as_tensor(get("embedding")).float()
        tok = tok.view(1, -1) if tok.dim() == 1 else tok
        feat = feat.unsqueeze(0) if feat.dim() == 2 else feat
        emb = emb.view(1, -1) if emb.dim() == 1 else emb
        if tok.dim() != 2 or tok.size(0) != 1 or feat.dim() != 3 or feat.size(0) != 1 or emb.size(0) != 1:
            raise ValueError(f"voice conds must have batch 1: prompt_token {tuple(tok.shape)}, "
                             f"prompt_feat {tuple(feat.shape)}, embedding {tuple(emb.shape)}")
        return VoiceCond(tok, feat, emb)

    def to(self, device=None, dtype=None) -> "VoiceCond":
        return VoiceCond(self.prompt_token.to(device), self.prompt_feat.to(device=device, dtype=dtype),
                         self.embedding.to(device=device, dtype=dtype))

    @property
    def n_prompt_tokens(self) -> int:
        return self.prompt_token.size(1)

    @property
    def n_prompt_frames(self) -> int:
        return self.prompt_feat.size(1)


def check_tokens(tokens: Any, vocab_size: int) -> torch.Tensor:
    """Validate speech tokens -> (T,) int64 tensor. Raises ValueError / TypeError naming the problem."""
    if isinstance(tokens, torch.Tensor):
        t = tokens
    elif isinstance(tokens, (list, tuple)) and len(tokens) == 0:
        raise ValueError("speech tokens are empty")
    else:
        try:
            t = torch.as_tensor(tokens)
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"speech tokens must be a sequence of ints, got {type(tokens).__name__}") from e
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"speech tokens must be integers, got dtype {t.dtype}")
    if t.dim() == 2 and t.size(0) == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"speech tokens must be a 1-D sequence (or shape (1, T)), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("speech tokens are empty")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"speech token id {bad} out of range: ids must be in [0, {vocab_size - 1}]")
    return t.long()


class S3GenModel(nn.Module):
    def __init__(self, cfg: S3GenConfig | None = None):
        super().__init__()
        self.cfg = cfg or S3GenConfig.preset("turbo")
        self.flow = TokenToMel(self.cfg)
        self.mel2wav = HiFTGenerator(self.cfg)

    # ---- loading ------------------------------------------------------------------------------
    def load_s3gen_state(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Strictly load upstream-named weights; returns the skipped voice-cloning keys."""
        kept, skipped = split_s3gen_state(state)
        self.load_state_dict(kept, strict=True)
        return skipped

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], cfg: S3GenConfig | None = None) -> "S3GenModel":
        kept, _ = split_s3gen_state(state)
        cfg = cfg or S3GenConfig.from_state_dict_shapes({k: tuple(v.shape) for k, v in kept.items()})
        model = cls(cfg)
        model.load_s3gen_state(state)
        return model.eval()

    @classmethod
    def from_file(cls, path, device: str | torch.device = "cpu") -> "S3GenModel":
        """From ``s3gen_meanflow.safetensors``."""
        from safetensors.torch import load_file

        return cls.from_state_dict(load_file(str(path))).to(device)

    @property
    def device(self) -> torch.device:
        return self.flow.input_embedding.weight.device

    # ---- offline API --------------------------------------------------------------------------
    def mel_noise(self, voice: VoiceCond, n_tokens: int, seed: int) -> torch.Tensor:
        """Positional flow noise for prompt + tokens: (1, n_mels, ratio*(Tp+T))."""
        n = self.cfg.token_mel_ratio * (voice.n_prompt_tokens + n_tokens)
        return PositionalNoise(seed, self.cfg.n_mels).mel(0, n, device=self.device).unsqueeze(0)

    def source_noise(self, n_samples: int, seed: int) -> SourceNoise:
        pn = PositionalNoise(seed, self.cfg.n_mels, self.cfg.hift_harmonics + 1)
        return SourceNoise(pn.source_phase(self.device).unsqueeze(0),
                           pn.source_noise(0, n_samples, device=self.device).unsqueeze(0))

    @torch.inference_mode()
    def tokens_to_mel(self, tokens: Any, voice: VoiceCond, noise: torch.Tensor | None = None,
                      seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Speech tokens (T,) -> mel (1, n_mels, ratio*T).

        noise: (1, n_mels, ratio*(Tp+T)) initial flow state for prompt + token frames; else drawn
        from ``seed`` (positional noise, equal to what a streaming session of that seed uses) or
        from ``generator`` (one ``randn`` call).
        """
        tok = check_tokens(tokens, self.cfg.vocab_size).to(self.device)
        voice = voice.to(self.device)
        n_frames = self.cfg.token_mel_ratio * (voice.n_prompt_tokens + tok.numel())
        if noise is None:
            if seed is not None:
                noise = self.mel_noise(voice, tok.numel(), seed)
            else:
                noise = torch.randn(1, self.cfg.n_mels, n_frames, generator=generator).to(self.device)
        if tuple(noise.shape) != (1, self.cfg.n_mels, n_frames):
            raise ValueError(f"flow noise must have shape {(1, self.cfg.n_mels, n_frames)}, got {tuple(noise.shape)}")
        all_tokens = torch.cat([voice.prompt_token, tok.unsqueeze(0)], dim=1)
        spk = self.flow.speaker(voice.embedding)
        return self.flow(all_tokens, voice.prompt_feat, spk, noise.to(self.device))

    @torch.inference_mode()
    def mel_to_wav(self, mel: torch.Tensor, source: SourceNoise | None = None, seed: int | None = None,
                   generator: torch.Generator | None = None, fade_in: bool = True) -> torch.Tensor:
        """mel (1, n_mels, F) -> audio (1, F*hop_samples), with upstream's start fade."""
        n = mel.size(-1) * self.cfg.hop_samples
        if source is None:
            if seed is not None:
                source = self.source_noise(n, seed)
            else:
                source = SourceNoise.draw(mel.size(0), self.cfg.hift_harmonics + 1, n, generator)
        wav, _ = self.mel2wav(mel, SourceNoise(source.phase.to(mel), source.noise.to(mel)))
        if fade_in:
            wav = wav * trim_fade(wav.size(-1), self.cfg.sample_rate, wav.device, wav.dtype)
        return wav

    @torch.inference_mode()
    def synthesize(self, tokens: Any, voice: VoiceCond, seed: int | None = None,
                   flow_noise: torch.Tensor | None = None, source: SourceNoise | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Speech tokens (T,) -> float32 audio (T * samples_per_token,) at 24 kHz."""
        mel = self.tokens_to_mel(tokens, voice, noise=flow_noise, seed=seed, generator=generator)
        return self.mel_to_wav(mel, source, seed=seed, generator=generator)[0].float()
