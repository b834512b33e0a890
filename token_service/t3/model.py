"""T3: a GPT-2 decoder over [voice prefix | text | speech] embeddings, with a static KV cache.

Parameter names equal upstream ``chatterbox-tts`` keys, so its ``t3_turbo_v1.safetensors`` loads
strictly: ``tfmr.{wte,wpe,h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj},ln_f}``,
``cond_enc.spkr_enc``, ``text_emb``, ``speech_emb``, ``text_head``, ``speech_head``.
Linear layers inside the transformer use GPT-2's ``Conv1D`` layout: weight ``(in, out)``.

Inference never uses ``tfmr.wte`` (inputs are our own embeddings) nor ``text_head``; both stay
loadable for strict loading and export, and :meth:`T3Model.drop_unused` removes them before the
model goes to the accelerator (upstream deletes ``wte`` the same way).

One forward, :meth:`T3Model.forward_embeds`, serves every phase. It takes input embeddings
``(B, T, C)`` with absolute positions ``(B, T)`` and a KV cache view per layer
``(B, H, L, D)``; it writes the new keys/values at ``positions`` and attends every query to the
cache entries at positions ``<=`` its own. Shapes are static given (B, T, L), so a CUDA graph can
capture the decode step (T = 1); per-row positions let rows of different lengths share a batch.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import T3Config


def gelu_new(x: Tensor) -> Tensor:
    """GPT-2's tanh-approximated GELU (``activation_function="gelu_new"``), written as GPT-2 does.

    Reference only: :class:`MLP` uses ``F.gelu(approximate="tanh")``, the same formula in one
    fused kernel (max difference 5e-7 on N(0, 16) inputs in float32; fewer kernels per decode step).
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def prefill_attention_backends(device: torch.device | str):
    """Context for variable-shape (eager) prefills: on CUDA, SDPA without the cuDNN backend.

    cuDNN attention (PyTorch's first choice on H100) builds an execution plan for every new
    (query length, key length); measured on an H100: 1.0–1.5 s for the first prefill of each new
    text length, 22 ms afterwards. The other backends have no such cost (20–32 ms first time).
    Fixed-shape decode steps and bucketed prefills keep cuDNN (plans built once at capture; it is
    the faster one for decode: 1.48 vs 2.02 ms per batch-1 step). CPU: no change.
    """
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``y = x @ weight + bias`` with ``weight`` stored as ``(in, out)``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


class KVCache:
    """Preallocated keys and values for ``n_slots`` sequences of up to ``max_len`` positions.

    ``k[layer]``, ``v[layer]``: ``(n_slots, n_head, max_len, head_dim)``. A slot is one sequence;
    :meth:`view` gives the per-layer views a forward writes into.
    """

    def __init__(self, cfg: T3Config, n_slots: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if max_len > cfg.n_positions:
            raise ValueError(f"KV cache max_len={max_len} exceeds the model's n_positions={cfg.n_positions}")
        shape = (n_slots, cfg.n_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.n_slots, self.max_len = n_slots, max_len

    def view(self, slots: slice, length: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per-layer ``(k, v)`` views of ``slots`` over the first ``length`` positions (all if None)."""
        n = self.max_len if length is None else length
        return [(k[slots, :, :n], v[slots, :, :n]) for k, v in zip(self.k, self.v)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor, rows: Tensor, positions: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        """x ``(B, T, C)``; rows ``(B, 1)`` cache row per input row; positions ``(B, T)``;
        kv cache views ``(B, H, L, D)``; mask ``(B, 1, T, L)`` additive (0 = attend, -inf = not)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k_cache, v_cache = kv
        # write the new keys/values at their positions: index (B, T) -> values (B, T, H, D)
        k_cache.transpose(1, 2)[rows, positions] = k.view(B, T, self.n_head, self.head_dim).to(k_cache.dtype)
        v_cache.transpose(1, 2)[rows, positions] = v.view(B, T, self.n_head, self.head_dim).to(v_cache.dtype)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rows: Tensor, positions: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), rows, positions, kv, mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """The transformer trunk (upstream's ``tfmr``): learned positions, blocks, final norm."""

    def __init__(self, cfg: T3Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.text_vocab_size, cfg.n_embd)  # unused at inference; kept for strict loading
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)


class CondEncoder(nn.Module):
    """Upstream's ``cond_enc``: only the speaker projection is used by Turbo."""

    def __init__(self, cfg: T3Config):
        super().__init__()
        self.spkr_enc = nn.Linear(cfg.speaker_embed_size, cfg.n_embd)


class T3Model(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.cfg = cfg
        self.tfmr = GPT2(cfg)
        self.cond_enc = CondEncoder(cfg)
        self.text_emb = nn.Embedding(cfg.text_vocab_size, cfg.n_embd)
        self.speech_emb = nn.Embedding(cfg.speech_vocab_size, cfg.n_embd)
        self.text_head = nn.Linear(cfg.n_embd, cfg.text_vocab_size, bias=False)  # unused at inference
        self.speech_head = nn.Linear(cfg.n_embd, cfg.speech_vocab_size, bias=True)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], cfg: T3Config | None = None) -> "T3Model":
        """Build on the meta device and load ``sd`` strictly (errors name missing/unexpected/misshaped keys)."""
        cfg = cfg or T3Config.from_state_dict(sd)
        with torch.device("meta"):
            model = cls(cfg)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise ValueError(f"T3 state dict does not match preset {cfg.name!r}: "
                             f"missing {missing[:8]}{'…' if len(missing) > 8 else ''}, "
                             f"unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}")
        for k, t in expected.items():
            if tuple(sd[k].shape) != tuple(t.shape):
                raise ValueError(f"T3 state dict: {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)} "
                                 f"for preset {cfg.name!r}")
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval()

    def drop_unused(self) -> "T3Model":
        """Remove ``tfmr.wte`` and ``text_head`` (never used at inference) to save memory."""
        for owner, name in ((self.tfmr, "wte"), (self, "text_head")):
            if hasattr(owner, name):
                delattr(owner, name)
        return self

    # ------------------------------------------------------------------ embeddings
    def speaker_embed(self, speaker_emb: Tensor) -> Tensor:
        """speaker_emb ``(N, speaker_embed_size)`` -> ``(N, 1, C)``."""
        return self.cond_enc.spkr_enc(speaker_emb.reshape(-1, self.cfg.speaker_embed_size))[:, None]

    # ------------------------------------------------------------------ transformer
    def forward_embeds(self, embeds: Tensor, positions: Tensor, kv: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Run the trunk over ``embeds`` ``(B, T, C)`` at ``positions`` ``(B, T)`` (int64).

        ``kv``: per layer ``(k, v)`` cache views ``(B, H, L, D)``; row ``b`` of the views belongs to
        row ``b`` of the input. New keys/values are written at ``positions``; query ``t`` of row
        ``b`` attends to cache positions ``<= positions[b, t]`` (causal within the chunk too).
        Returns the final-normed hidden states ``(B, T, C)``.
        """
        B, T, _ = embeds.shape
        L = kv[0][0].shape[2]
        rows = torch.arange(B, device=embeds.device)[:, None]  # (B, 1)
        visible = torch.arange(L, device=embeds.device)[None, None, :] <= positions[:, :, None]  # (B, T, L)
        # additive mask built once per forward (SDPA would convert a bool mask in every layer)
        mask = torch.zeros(visible.shape, dtype=embeds.dtype, device=embeds.device)
        mask = mask.masked_fill(~visible, float("-inf"))[:, None]  # (B, 1, T, L)
        x = embeds + self.tfmr.wpe(positions)
        for block, layer_kv in zip(self.tfmr.h, kv):
            x = block(x, rows, positions, layer_kv, mask)
        return self.tfmr.ln_f(x)

    def speech_logits(self, hidden: Tensor) -> Tensor:
        """hidden ``(..., C)`` -> speech logits ``(..., speech_vocab_size)`` in float32."""
        return self.speech_head(hidden).float()
