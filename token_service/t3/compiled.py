"""The decode step (T = 1) as ``torch.compile``'d segments cut at attention (opt-in; issue 6).

A batch-1 decode step of the eager model is ~400 small kernels (bench/NOTES.md run 4): per layer
two LayerNorms, four matrix products, bias adds, GELU, two residual adds, two K/V ``index_put``
writes and attention. Inductor fuses everything *between* two attention calls into a few Triton
kernels: ``c_proj → residual → ln_2 → c_fc → GELU → c_proj → residual → ln_1 (next layer) →
c_attn → K/V write``. With ``coordinate_descent_tuning`` inductor also turns an ``M = 1`` matrix
product into a Triton reduction (see :func:`_linear`), so at batch 1 the bias, the GELU and the
residual can land in the product's own kernel.

Why segments and not one graph per step: the decode step is specialised per (batch bucket, KV
bucket), and compiling the whole step once per pair (8 KV buckets × 4–9 batch buckets) would cost
many minutes at start-up. Attention is the only part that depends on the KV bucket, so it stays
outside, exactly as eager (``F.scaled_dot_product_attention`` on the cache views, same backend
choice), and each segment is specialised only on the batch bucket (it gets cache rows ``0..B-1``
over all positions) — one small graph per segment and batch bucket, shared by all slot groups. (vLLM's piecewise compilation cuts at attention the
same way.) Every segment is ``fullgraph=True, dynamic=False``; inductor adds no CUDA graphs of its
own: the engine's capture (``ModelRunner.capture_graphs``) records the Triton kernels after the
warm-up calls have compiled them.

Segments (``B`` rows, ``C`` width, ``H`` heads, ``D = C / H``):

* ``_enter``: speech embedding + position embedding, layer 0's ``ln_1`` / ``c_attn``, K/V write
  -> residual ``x (B, C)``, query ``q (B, H, 1, D)``.
* ``_between``: layer ``i``'s attention output ``y (B, H, 1, D)`` through ``c_proj`` and the
  MLP, then layer ``i + 1``'s ``ln_1`` / ``c_attn`` / K/V write -> ``x``, ``q``.
* ``_leave``: the last layer's ``c_proj`` and MLP, ``ln_f``, speech head -> logits ``(B, V)`` float32.
* ``sample_rows`` (optional): ``process_logits_topk`` + softmax + the hashed draw -> ids ``(B,)``.

The K/V write is an in-place ``index_put_`` into the cache rows ``(B, H, max_len, D)`` (a graph-input
mutation, which inductor performs in place: no copy of the cache).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import KVCache, T3Model
from .sampling import process_logits_topk, sample

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 64  # specialisations per segment: one per batch bucket (9 by default), with room to spare

BlockWeights = tuple[Tensor, ...]  # ln_1 w/b, c_attn w/b, attn c_proj w/b, ln_2 w/b, c_fc w/b, mlp c_proj w/b


def configure_inductor() -> None:
    """gpt-fast's inductor settings, and a recompile limit that fits every bucket (process-wide)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = True  # also: M = 1 matmuls become fusable Triton reductions
    inductor_config.triton.unique_kernel_names = True
    inductor_config.fx_graph_cache = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 4 * RECOMPILE_LIMIT))


# ---------------------------------------------------------------------------------- segments
def _layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``x (B, in) @ w (in, out) + b``, written as ``mm`` + add, not ``addmm``: inductor decomposes an
    ``M = 1`` ``mm`` (not ``addmm``) into a Triton reduction when ``coordinate_descent_tuning`` is on,
    and the bias add then fuses into it; for ``M > 1`` the ``mm`` stays cuBLAS and the add fuses into
    the next pointwise kernel."""
    return torch.mm(x, w) + b


def _attn_in(x: Tensor, w: BlockWeights, k_cache: Tensor, v_cache: Tensor, positions: Tensor, n_head: int,
             eps: float) -> Tensor:
    """``ln_1`` + ``c_attn`` of one layer on ``x (B, C)``; writes K/V of rows ``0..B-1`` at ``positions (B,)``
    into the caches ``(S, H, L, D)``; returns ``q (B, H, 1, D)``."""
    B, C = x.shape
    D = C // n_head
    q, k, v = _linear(_layer_norm(x, w[0], w[1], eps), w[2], w[3]).split(C, dim=-1)
    rows = torch.arange(B, device=x.device)[:, None]
    heads = torch.arange(n_head, device=x.device)[None, :]
    pos = positions[:, None]
    k_cache.index_put_((rows, heads, pos), k.view(B, n_head, D).to(k_cache.dtype))
    v_cache.index_put_((rows, heads, pos), v.view(B, n_head, D).to(v_cache.dtype))
    return q.view(B, n_head, 1, D)


def _attn_out_mlp(x: Tensor, y: Tensor, w: BlockWeights, eps: float) -> Tensor:
    """Residual stream after one layer: ``x (B, C)``, attention output ``y (B, H, 1, D)``."""
    x = x + _linear(y.transpose(1, 2).reshape(x.shape), w[4], w[5])
    h = F.gelu(_linear(_layer_norm(x, w[6], w[7], eps), w[8], w[9]), approximate="tanh")
    return x + _linear(h, w[10], w[11])


def _enter(tokens: Tensor, positions: Tensor, speech_emb: Tensor, wpe: Tensor, w: BlockWeights, k_cache: Tensor,
           v_cache: Tensor, n_head: int, eps: float) -> tuple[Tensor, Tensor]:
    x = F.embedding(tokens, speech_emb).to(k_cache.dtype) + F.embedding(positions, wpe)
    return x, _attn_in(x, w, k_cache, v_cache, positions, n_head, eps)


def _between(x: Tensor, y: Tensor, w: BlockWeights, w_next: BlockWeights, k_cache: Tensor, v_cache: Tensor,
             positions: Tensor, n_head: int, eps: float) -> tuple[Tensor, Tensor]:
    x = _attn_out_mlp(x, y, w, eps)
    return x, _attn_in(x, w_next, k_cache, v_cache, positions, n_head, eps)


def _leave(x: Tensor, y: Tensor, w: BlockWeights, ln_f_w: Tensor, ln_f_b: Tensor, head_w: Tensor, head_b: Tensor,
           eps: float) -> Tensor:
    x = _attn_out_mlp(x, y, w, eps)
    return _linear(_layer_norm(x, ln_f_w, ln_f_b, eps), head_w.t(), head_b).float()


def _sample_rows(logits: Tensor, seen: Tensor, temperature: Tensor, top_k: Tensor, top_p_threshold: Tensor,
                 top_p_on: Tensor, penalty: Tensor, seed: Tensor, step: Tensor, vhash: Tensor, width: int) -> Tensor:
    scores = process_logits_topk(logits, seen, temperature, top_k, top_p_threshold, top_p_on, penalty, width=width)
    return sample(scores.softmax(dim=-1), seed, step, vhash)


def block_weights(block) -> BlockWeights:
    a, m = block.attn, block.mlp
    return (block.ln_1.weight, block.ln_1.bias, a.c_attn.weight, a.c_attn.bias, a.c_proj.weight, a.c_proj.bias,
            block.ln_2.weight, block.ln_2.bias, m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias)


# ---------------------------------------------------------------------------------- the step
class CompiledDecode:
    """``decode_step`` (T = 1) through compiled segments; the same numbers as the eager step up to
    fusion rounding. Holds references to ``model``'s parameters: build it after the model has its
    final device and dtype.

    Compilation is lazy: the first call with a new number of rows compiles (seconds to a minute on
    a GPU), later calls run the compiled code (or are replayed inside a CUDA graph).
    """

    def __init__(self, model: T3Model, mode: str = "default"):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        configure_inductor()
        self.model = model
        cfg = model.cfg
        self.n_head, self.eps = cfg.n_head, cfg.layer_norm_eps
        self.weights = [block_weights(b) for b in model.tfmr.h]
        opts = dict(fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
        self._enter = torch.compile(_enter, **opts)
        self._between = torch.compile(_between, **opts)
        self._leave = torch.compile(_leave, **opts)
        self._sample = torch.compile(_sample_rows, **opts)

    def logits(self, cache: KVCache, n_rows: int, tokens: Tensor, positions: Tensor, length: int | None = None) -> Tensor:
        """Same contract as :func:`token_service.t3.generate.decode_step`: feed ``tokens (B,)`` at
        ``positions (B,)`` for cache slots ``0..B-1``, attend to the first ``length`` positions;
        returns logits ``(B, V)`` float32."""
        m, W, H, eps = self.model, self.weights, self.n_head, self.eps
        L = cache.max_len if length is None else length
        # additive mask (B, 1, 1, L), built once per step outside the segments (it depends on L)
        visible = torch.arange(L, device=tokens.device)[None, :] <= positions[:, None]
        mask = torch.zeros(visible.shape, dtype=cache.k[0].dtype, device=tokens.device)
        mask = mask.masked_fill(~visible, float("-inf"))[:, None, None]
        # the segments get rows 0..B-1 of the whole cache, (B, H, max_len, D): their shapes then depend
        # on the batch bucket only, so every slot group with that bucket shares the compiled code
        ks, vs = [k[:n_rows] for k in cache.k], [v[:n_rows] for v in cache.v]
        x, q = self._enter(tokens, positions, m.speech_emb.weight, m.tfmr.wpe.weight, W[0], ks[0], vs[0], H, eps)
        last = len(W) - 1
        for i in range(len(W)):
            y = F.scaled_dot_product_attention(q, ks[i][:, :, :L], vs[i][:, :, :L], attn_mask=mask)  # (B, H, 1, D)
            if i < last:
                x, q = self._between(x, y, W[i], W[i + 1], ks[i + 1], vs[i + 1], positions, H, eps)
            else:
                return self._leave(x, y, W[i], m.tfmr.ln_f.weight, m.tfmr.ln_f.bias, m.speech_head.weight,
                                   m.speech_head.bias, eps)
        raise AssertionError("unreachable")

    def sample(self, logits: Tensor, seen: Tensor, temperature: Tensor, top_k: Tensor, top_p_threshold: Tensor,
               top_p_on: Tensor, penalty: Tensor, seed: Tensor, step: Tensor, vhash: Tensor, width: int) -> Tensor:
        """``process_logits_topk`` → softmax → hashed draw, compiled; returns ids ``(B,)``."""
        return self._sample(logits, seen, temperature, top_k, top_p_threshold, top_p_on, penalty, seed, step, vhash,
                            width)
