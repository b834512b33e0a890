"""Meanflow velocity estimator: a 1-D U-net of causal conv ResNet blocks and transformer blocks.

Input per frame: noisy mel x, encoder output mu, speaker vector, prompt-mel condition (4 x n_mels
channels). Conditioned on the flow times (t, r) through sinusoidal embeddings, an MLP and a mixer
(``time_embed_mixer``: meanflow's average-velocity interval). Parameter names follow upstream's
keys under ``flow.decoder.estimator.``. Convolutions are causal; attention spans the whole
sequence (only padded keys are masked).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import S3GenConfig


def timestep_sinusoids(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """t: (B,) flow time in [0, 1] -> (B, dim) [sin | cos] features."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    arg = scale * t.unsqueeze(1) * freq.unsqueeze(0)
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class TimeMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only (output frame i sees input frames <= i)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, T) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvNormMish(nn.Module):
    """Masked causal conv(3) -> channel LayerNorm -> Mish. Keys ``block.0`` (conv), ``block.2`` (norm)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(CausalConv1d(dim_in, dim_out, 3), nn.Identity(), ChannelLayerNorm(dim_out),
                                   nn.Identity(), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """mask None = no padded frames (skips the two multiplications)."""
        if mask is None:
            return self.block(x)
        return self.block(x * mask) * mask


class TimeResBlock(nn.Module):
    """Two ConvNormMish blocks, the time embedding added in between, plus a 1x1 residual conv."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = ConvNormMish(dim_in, dim_out)
        self.block2 = ConvNormMish(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim_in, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, Cin, T); mask: (B, 1, T) or None (no padding); temb: (B, time_dim) -> (B, Cout, T)."""
        h = self.block1(x, mask) + self.mlp(temb).unsqueeze(-1)
        return self.block2(h, mask) + self.res_conv(x if mask is None else x * mask)


class SelfAttention(nn.Module):
    """Plain multi-head attention; q/k/v without bias, ``to_out.0`` with bias."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, dim); bias: (B, 1, 1, T) additive key bias, or None (no padding: lets SDPA
        pick its flash kernel) -> (B, T, dim)."""
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, -1))


class GeluFeedForward(nn.Module):
    """``net.0.proj`` -> exact GELU -> ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, dim * mult)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x)))


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn1(norm1(x)); x + ff(norm3(x))."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GeluFeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


def _transformers(cfg: S3GenConfig) -> nn.ModuleList:
    return nn.ModuleList(TransformerBlock(cfg.dec_channels, cfg.dec_heads, cfg.dec_head_dim)
                         for _ in range(cfg.dec_transformers))


class MeanflowEstimator(nn.Module):
    """Predicts the average velocity over [t, r]: (x, mu, spk, cond, t, r) -> (B, n_mels, T)."""

    def __init__(self, cfg: S3GenConfig):
        super().__init__()
        C, tdim, cin = cfg.dec_channels, cfg.time_embed_dim, cfg.dec_in_channels
        self.in_channels = cin
        self.time_mlp = TimeMLP(cin, tdim)
        self.time_embed_mixer = nn.Linear(2 * tdim, tdim, bias=False)
        self.down_blocks = nn.ModuleList([nn.ModuleList([TimeResBlock(cin, C, tdim), _transformers(cfg),
                                                         CausalConv1d(C, C, 3)])])
        self.mid_blocks = nn.ModuleList(nn.ModuleList([TimeResBlock(C, C, tdim), _transformers(cfg)])
                                        for _ in range(cfg.dec_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList([TimeResBlock(2 * C, C, tdim), _transformers(cfg),
                                                       CausalConv1d(C, C, 3)])])
        self.final_block = ConvNormMish(C, C)
        self.final_proj = nn.Conv1d(C, cfg.n_mels, 1)

    def time_embedding(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """t, r: (B,) -> (B, time_dim) (in the weights' dtype)."""
        dt = self.time_embed_mixer.weight.dtype
        et = self.time_mlp(timestep_sinusoids(t.float(), self.in_channels).to(dt))
        er = self.time_mlp(timestep_sinusoids(r.float(), self.in_channels).to(dt))
        return self.time_embed_mixer(torch.cat([et, er], dim=1))

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.transpose(1, 2)
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, mu: torch.Tensor, t: torch.Tensor,
                r: torch.Tensor, spk: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x, mu, cond: (B, n_mels, T); mask: (B, 1, T), or None when no frame is padding (the
        same numbers, fewer kernels); t, r: (B,) or (1,); spk: (B, n_mels).

        Inputs are cast to the weights' dtype (half-precision weights take fp32 inputs); the
        velocity is returned in that dtype.
        """
        dt = self.final_proj.weight.dtype
        temb = self.time_embedding(t, r)
        h = torch.cat([x.to(dt), mu.to(dt), spk.to(dt).unsqueeze(-1).expand(-1, -1, x.size(-1)), cond.to(dt)], dim=1)
        if mask is None:
            bias = None
        else:
            mask = mask.to(dt)
            bias = ((1.0 - mask) * -1.0e10).unsqueeze(1)  # (B, 1, 1, T)
        m = (lambda v: v) if mask is None else (lambda v: v * mask)
        resnet, blocks, down = self.down_blocks[0]
        h = resnet(h, mask, temb)
        h = self._run(blocks, h, bias)
        skip = h
        h = down(m(h))
        for resnet, blocks in self.mid_blocks:
            h = self._run(blocks, resnet(h, mask, temb), bias)
        resnet, blocks, up = self.up_blocks[0]
        h = resnet(torch.cat([h, skip], dim=1), mask, temb)
        h = up(m(self._run(blocks, h, bias)))
        h = self.final_block(h, mask)
        return m(self.final_proj(m(h)))
