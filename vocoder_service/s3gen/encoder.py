"""Upsample conformer encoder: speech-token embeddings (25 Hz) -> hidden states at mel rate (50 Hz).

Structure (parameter names follow upstream's keys under ``flow.encoder.``):
``embed`` (linear + layernorm, rel-pos scaling) -> ``pre_lookahead_layer`` (conv seeing
``pre_lookahead`` tokens ahead) -> ``encoders`` (conformer blocks, full-context relative-position
self-attention) -> ``up_layer`` (nearest x2 + causal conv) -> ``up_embed`` -> ``up_encoders``
-> ``after_norm``.  Attention is bidirectional over the whole sequence (no chunk mask).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import S3GenConfig


_POS_TABLES: dict[tuple, torch.Tensor] = {}
_POS_TABLES_MAX = 128


def relative_position_table(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoids for relative distances ``length-1 .. -(length-1)``: (1, 2*length-1, dim).

    Row ``k`` encodes distance ``length-1-k`` (query index minus key index).  Cached per
    (length, dim, device, dtype): the table is a constant, and building it on the host and copying
    it to the GPU inside every step would both cost time and break CUDA-graph capture (a host ->
    device copy is not allowed while a stream is capturing; the warm-up run fills the cache).
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # export: keep the length symbolic
        return _relative_position_table(length, dim).to(device=device, dtype=dtype)
    key = (length, dim, str(torch.device(device) if device is not None else "cpu"), dtype)
    table = _POS_TABLES.get(key)
    if table is None:
        if len(_POS_TABLES) >= _POS_TABLES_MAX:
            _POS_TABLES.clear()
        table = _POS_TABLES[key] = _relative_position_table(length, dim).to(device=device, dtype=dtype)
    return table


def _relative_position_table(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length - 1, -length, -1, dtype=torch.float32).unsqueeze(1)  # (2L-1, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(2 * length - 1, dim)
    # positive distances use sin(p*f), cos(p*f); negative ones sin(-p*f), cos(-p*f): same formula.
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table.unsqueeze(0)


class InputProjection(nn.Module):
    """Linear + LayerNorm, then scale by sqrt(dim) (rel-pos convention). Key: ``out.0``, ``out.1``."""

    def __init__(self, dim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-5))
        self.scale = math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D) -> (scaled x (B, T, D), relative position table (1, 2T-1, D))."""
        x = self.out(x) * self.scale
        return x, relative_position_table(x.size(1), x.size(2), x.device, x.dtype)


class RelPositionSelfAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (biases u, v)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.head_dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, D); pos: (1, 2T-1, D); key_mask: (B, T) bool (True = real) or None."""
        B, T, D = x.shape
        H, Dh = self.heads, self.head_dim
        q = self.linear_q(x).view(B, T, H, Dh)
        k = self.linear_k(x).view(B, T, H, Dh).transpose(1, 2)
        v = self.linear_v(x).view(B, T, H, Dh).transpose(1, 2)
        p = self.linear_pos(pos).view(1, -1, H, Dh).transpose(1, 2)  # (1, H, 2T-1, Dh)
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (B,H,T,2T-1)
        # pick, for query i and key j, the column of distance i-j: k = T-1-i+j
        idx = (T - 1) - torch.arange(T, device=x.device).unsqueeze(1) + torch.arange(T, device=x.device)
        position = position.gather(-1, idx.expand(B, H, T, T))
        # softmax((q+u) k^T / sqrt(Dh) + position / sqrt(Dh)) v as one fused attention with an
        # additive bias (same numbers to rounding; no (B,H,T,T) softmax round trip); padded keys
        # get -inf (every row has real keys: the prompt)
        bias = position / math.sqrt(Dh)
        if key_mask is not None:
            bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention((q + self.pos_bias_u).transpose(1, 2), k, v, attn_mask=bias)
        return self.linear_out(out.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    """w_1 -> SiLU -> w_2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm_mha(x)); x + ffn(norm_ff(x)) (no conv module, no macaron)."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = RelPositionSelfAttention(dim, heads)
        self.feed_forward = FeedForward(dim, ffn)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-12)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos, key_mask)
        return x + self.feed_forward(self.norm_ff(x))


class LookaheadConv(nn.Module):
    """Residual conv pair: conv1 sees ``lookahead`` future tokens, conv2 two past ones."""

    def __init__(self, dim: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        h = F.pad(x.transpose(1, 2), (0, self.lookahead))
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (2, 0)))
        return h.transpose(1, 2) + x


class NearestUpsampleConv(nn.Module):
    """Repeat each frame ``stride`` times, then a causal conv of width 2*stride+1."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(dim, dim, 2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D, T) -> (B, D, stride*T)."""
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(x, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, cfg: S3GenConfig):
        super().__init__()
        d = cfg.enc_dim
        self.embed = InputProjection(d)
        self.pre_lookahead_layer = LookaheadConv(d, cfg.pre_lookahead)
        self.encoders = nn.ModuleList(ConformerBlock(d, cfg.enc_heads, cfg.enc_ffn) for _ in range(cfg.enc_blocks))
        self.up_layer = NearestUpsampleConv(d, cfg.token_mel_ratio)
        self.up_embed = InputProjection(d)
        self.up_encoders = nn.ModuleList(
            ConformerBlock(d, cfg.enc_heads, cfg.enc_ffn) for _ in range(cfg.enc_up_blocks)
        )
        self.after_norm = nn.LayerNorm(d, eps=1e-5)
        self.ratio = cfg.token_mel_ratio

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x: token embeddings (B, T, D); lengths: (B,) or None (all full) -> (B, ratio*T, D).

        With ``lengths``, row b's first ``ratio*lengths[b]`` outputs equal an unpadded run of its
        first ``lengths[b]`` tokens (to rounding): padded positions are zeroed before the only
        right-looking layer (the look-ahead conv, which sees zeros past a sequence's end) and are
        masked out of every attention; everything else is per position or causal.
        """
        T = x.size(1)
        mask = None if lengths is None else torch.arange(T, device=x.device) < lengths[:, None]
        x, pos = self.embed(x)
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        x = self.pre_lookahead_layer(x)
        for block in self.encoders:
            x = block(x, pos, mask)
        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        if mask is not None:
            mask = mask.repeat_interleave(self.ratio, dim=1)
        x, pos = self.up_embed(x)
        for block in self.up_encoders:
            x = block(x, pos, mask)
        return self.after_norm(x)
