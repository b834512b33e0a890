"""Helpers shared by the vocoder tests."""
from __future__ import annotations

import torch

from vocoder_service.s3gen.config import S3GenConfig
from vocoder_service.s3gen.model import VoiceCond


def random_voice(cfg: S3GenConfig, n_prompt: int = 20, seed: int = 0) -> VoiceCond:
    """A voice with conds.pt shapes: prompt tokens (1, Tp), prompt mel (1, 2Tp, n_mels), x-vector."""
    g = torch.Generator().manual_seed(seed)
    return VoiceCond(
        prompt_token=torch.randint(0, cfg.vocab_size, (1, n_prompt), generator=g),
        prompt_feat=torch.randn(1, 2 * n_prompt, cfg.n_mels, generator=g) * 2 - 5,
        embedding=torch.randn(1, cfg.spk_dim, generator=g),
    )


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def log_mel_distance(a: torch.Tensor, b: torch.Tensor, sample_rate: int = 24_000) -> float:
    """Mean absolute difference of natural-log mel spectrograms (80 mels, n_fft 1024, hop 256)."""
    import librosa

    fb = torch.from_numpy(librosa.filters.mel(sr=sample_rate, n_fft=1024, n_mels=80)).float()
    win = torch.hann_window(1024)

    def mel(x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x.float(), 1024, 256, window=win, return_complex=True).abs()
        return torch.log(fb @ spec + 1e-5)

    return (mel(a) - mel(b)).abs().mean().item()


def boundary_jumps(wav: torch.Tensor, boundaries: list[int]) -> tuple[float, float]:
    """(largest |x[i] - x[i-1]| across a chunk boundary, largest such step elsewhere)."""
    d = (wav[1:] - wav[:-1]).abs()
    inside = torch.ones_like(d, dtype=torch.bool)
    at = 0.0
    for x in boundaries:
        at = max(at, d[x - 1].item())
        inside[x - 1] = False
    return at, d[inside].max().item()
