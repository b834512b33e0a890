"""Token -> mel: token embedding, upsample conformer encoder, meanflow decoder (Euler, 2 steps).

Parameter names follow upstream's keys under ``flow.``: ``input_embedding``,
``spk_embed_affine_layer``, ``encoder.*``, ``encoder_proj``, ``decoder.estimator.*``.

The voice conditioning is used as upstream's ``CausalMaskedDiffWithXvec.inference`` uses it: the
prompt tokens are prepended to the tokens, the prompt mel fills the first ``prompt_frames`` frames
of the decoder condition (zeros after), the x-vector is L2-normalised and projected to n_mels,
and only the frames after the prompt are returned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import S3GenConfig
from .encoder import UpsampleConformerEncoder
from .estimator import MeanflowEstimator
from .noise import hashed_normal


class MeanflowDecoder(nn.Module):
    """Holds the estimator (key ``decoder.estimator``) and integrates the meanflow ODE."""

    def __init__(self, cfg: S3GenConfig):
        super().__init__()
        self.estimator = MeanflowEstimator(cfg)
        self.n_steps = cfg.n_flow_steps

    def forward(self, noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spk: torch.Tensor,
                cond: torch.Tensor, n_steps: int | None = None) -> torch.Tensor:
        """Euler steps over a uniform time grid 0 -> 1 (no cosine schedule, no CFG for meanflow).

        noise, mu, cond: (B, n_mels, T); mask: (B, 1, T); spk: (B, n_mels) -> mel (B, n_mels, T).
        The ODE state stays float32 whatever the estimator's dtype (half-precision weights get
        their inputs cast); ``mask`` may be None (no padded frame). Returns float32.
        """
        n = n_steps or self.n_steps
        grid = torch.linspace(0, 1, n + 1, device=mu.device, dtype=torch.float32)
        x = noise.float()
        for i in range(n):
            t, r = grid[i:i + 1], grid[i + 1:i + 2]
            x = x + (r - t) * self.estimator(x, mask, mu, t, r, spk, cond).float()
        return x


class TokenToMel(nn.Module):
    def __init__(self, cfg: S3GenConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.enc_dim)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_dim, cfg.n_mels)
        self.encoder = UpsampleConformerEncoder(cfg)
        self.encoder_proj = nn.Linear(cfg.enc_dim, cfg.n_mels)
        self.decoder = MeanflowDecoder(cfg)

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """x-vector (B, spk_dim) -> decoder speaker vector (B, n_mels)."""
        w = self.spk_embed_affine_layer.weight
        return self.spk_embed_affine_layer(F.normalize(embedding.float(), dim=1).to(w.dtype))

    def forward(self, tokens: torch.Tensor, prompt_feat: torch.Tensor, spk: torch.Tensor, noise: torch.Tensor,
                drop_tail_frames: int = 0, n_steps: int | None = None) -> torch.Tensor:
        """Mel for a token sequence that already starts with the prompt tokens.

        tokens: (B, Tp+T) int64, prompt tokens first; prompt_feat: (B, Fp, n_mels) prompt mel;
        spk: (B, n_mels) from ``speaker()``; noise: (B, n_mels, >= ratio*(Tp+T)-drop) initial
        flow state; drop_tail_frames: mel frames cut from the encoder output before decoding
        (upstream's non-final look-ahead cut). Returns float32 (B, n_mels, F - Fp) with
        F = ratio*(Tp+T) - drop_tail_frames, whatever the weights' dtype (encoder and estimator
        run in it; the ODE state stays float32).
        """
        h = self.encoder(self.input_embedding(tokens))
        if drop_tail_frames:
            h = h[:, :-drop_tail_frames]
        mu = self.encoder_proj(h).transpose(1, 2)  # (B, n_mels, F), the weights' dtype
        Fr, Fp = mu.size(2), prompt_feat.size(1)
        cond = self._prompt_cond(mu, prompt_feat)
        # no padded frame in a flow window: mask None (== all ones, fewer kernels, flash attention)
        mel = self.decoder(noise[:, :, :Fr], mu, None, spk, cond, n_steps)
        return mel[:, :, Fp:]

    @staticmethod
    def _prompt_cond(mu: torch.Tensor, prompt_feat: torch.Tensor) -> torch.Tensor:
        """The decoder's condition: the prompt mel in the first Fp frames, zeros after: like ``mu``."""
        cond = torch.zeros_like(mu)
        cond[:, :, :prompt_feat.size(1)] = prompt_feat.transpose(1, 2).to(mu.dtype)
        return cond

    def forward_padded(self, tokens: torch.Tensor, prompt_feat: torch.Tensor, spk: torch.Tensor, noise: torch.Tensor,
                       token_lengths: torch.Tensor, mel_lengths: torch.Tensor) -> torch.Tensor:
        """``forward`` for rows of different lengths, right-padded to one window (one batch, one shape).

        tokens: (B, T) int64, prompt first (the same prompt length Tp in every row), padding last;
        token_lengths: (B,) real tokens per row (the encoder's input); mel_lengths: (B,) frames per
        row the decoder sees (``ratio * token_lengths`` minus the row's ``drop_tail_frames``);
        noise: (B, n_mels, ratio*T). Returns float32 (B, n_mels, ratio*T - Fp): row b's first
        ``mel_lengths[b] - Fp`` frames equal ``forward`` on that row alone (to rounding); later
        frames are padding. The decoder is causal apart from its attention, whose padded keys are
        masked, so the padding never reaches a real frame.
        """
        h = self.encoder(self.input_embedding(tokens), token_lengths)
        mu = self.encoder_proj(h).transpose(1, 2)  # (B, n_mels, F)
        Fr, Fp = mu.size(2), prompt_feat.size(1)
        cond = self._prompt_cond(mu, prompt_feat)
        mask = (torch.arange(Fr, device=mu.device) < mel_lengths[:, None]).unsqueeze(1).to(mu.dtype)  # (B, 1, F)
        mel = self.decoder(noise[:, :, :Fr], mu, mask, spk, cond)
        return mel[:, :, Fp:]

    def _noise(self, n_tokens: int, prompt_noise: torch.Tensor, noise_index: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, ratio*n_tokens): ``prompt_noise`` (B, n_mels, Fp), then the positional flow noise
        of the later frames, row b from frame ``noise_index[b, 1]`` on with key ``noise_index[b, 0]``."""
        n = self.cfg.token_mel_ratio * n_tokens - prompt_noise.size(2)
        fresh = hashed_normal(noise_index[:, 0], noise_index[:, 1], n, self.cfg.n_mels)
        return torch.cat([prompt_noise, fresh], dim=2)

    def forward_noised(self, tokens: torch.Tensor, prompt_feat: torch.Tensor, spk: torch.Tensor,
                       prompt_noise: torch.Tensor, noise_index: torch.Tensor, drop_tail_frames: int = 0) -> torch.Tensor:
        """``forward`` with its noise hashed inside (``_noise``): a captured graph draws the noise too,
        instead of ~50 small eager kernels per step. noise_index: (B, 2) int64 (key, start frame) per row,
        batch first like every graphed input (the graph cache pads and slices dim 0)."""
        return self.forward(tokens, prompt_feat, spk, self._noise(tokens.size(1), prompt_noise, noise_index),
                            drop_tail_frames)

    def forward_padded_noised(self, tokens: torch.Tensor, prompt_feat: torch.Tensor, spk: torch.Tensor,
                              prompt_noise: torch.Tensor, noise_index: torch.Tensor, token_lengths: torch.Tensor,
                              mel_lengths: torch.Tensor) -> torch.Tensor:
        """``forward_padded`` with its noise hashed inside (see ``forward_noised``)."""
        return self.forward_padded(tokens, prompt_feat, spk, self._noise(tokens.size(1), prompt_noise, noise_index),
                                   token_lengths, mel_lengths)
