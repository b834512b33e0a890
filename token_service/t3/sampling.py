"""Sampling exactly as upstream's ``T3.inference_turbo``, batched and on the device.

Upstream builds a HuggingFace ``LogitsProcessorList`` in this order and applies it to the float32
speech logits of the last position:

1. temperature   ``s / T``                         (only if ``T > 0 and T != 1``)
2. top-k         ``s < kth largest -> -inf``       (only if ``k > 0``; ties with the kth are kept)
3. top-p         sort ascending, ``cumsum(softmax) <= 1 - p -> -inf``, the largest always kept
                                                    (only if ``p < 1``)
4. repetition    for every id in ``input_ids``: ``s < 0 ? s * r : s / r``   (only if ``r != 1``)

then ``softmax`` and one multinomial draw. Note the order: the penalty comes *after* the filters,
so it can re-rank tokens that survived them but never revives a filtered one (``-inf * r = -inf``).

``input_ids`` subtlety: for the first token (sampled from the prefill logits) ``input_ids`` is the
start-of-speech token ``[6561]``; for every later token it is the list of tokens generated so far
(*without* the start token). Callers keep it as a ``(B, V)`` bool "seen" mask.

Per-row parameters are tensors, so one batch may mix requests with different settings, and the
whole function has static shapes (CUDA-graph capturable). Random draws use a counter-based hash
of ``(seed, step, token id)``: each request is reproducible from its seed regardless of which
other requests share its batch, and no ``torch.Generator`` per slot is needed. The draw is the
"exponential race" ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)``, which picks ``i`` with
probability ``p_i`` exactly as ``torch.multinomial`` does (but not the same random numbers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from tts_common.hashing import MASK32, bits_to_unit, hash32



@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; the defaults are upstream ``generate``'s.

    ``max_new_tokens`` caps the number of sampled tokens including the stop token; upstream's
    ``max_gen_len=1000`` samples at most 1001 (one from the prefill + 1000 in its loop), hence 1001.
    ``temperature=0`` means "no temperature scaling" as in upstream (it is not greedy: use
    ``top_k=1`` for greedy). ``top_k=0`` and ``top_p=1`` switch those filters off.
    ``seed=None`` draws a random seed when the request starts.
    """

    temperature: float = 0.8
    top_k: int = 1000
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    max_new_tokens: int = 1001
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1


def row_values(p: SamplingParams, vocab: int) -> dict[str, float | int | bool]:
    """Scalars for one row, with upstream's on/off rules applied."""
    temp = p.temperature if (p.temperature > 0 and p.temperature != 1.0) else 1.0
    k = min(int(p.top_k), vocab) if p.top_k > 0 else vocab
    return dict(temperature=temp, top_k=k, top_p_threshold=1.0 - p.top_p, top_p_on=p.top_p < 1.0,
                penalty=p.repetition_penalty if p.repetition_penalty != 1.0 else 1.0)


def process_logits(logits: Tensor, seen: Tensor, temperature: Tensor, top_k: Tensor,
                   top_p_threshold: Tensor, top_p_on: Tensor, penalty: Tensor) -> Tensor:
    """Apply upstream's processors to ``logits`` ``(B, V)`` float32; returns processed scores ``(B, V)``.

    ``seen`` ``(B, V)`` bool marks upstream's ``input_ids``; the other arguments are ``(B,)``.
    """
    s = logits / temperature[:, None]
    # top-k: drop everything strictly below the k-th largest value
    desc = torch.sort(s, dim=-1, descending=True).values
    kth = desc.gather(1, (top_k - 1)[:, None])
    s = s.masked_fill(s < kth, float("-inf"))
    # top-p (HF TopPLogitsWarper, min_tokens_to_keep=1)
    asc, order = torch.sort(s, dim=-1, descending=False)
    cum = asc.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= top_p_threshold[:, None]
    drop_sorted[:, -1] = False
    drop_sorted &= top_p_on[:, None]
    drop = drop_sorted.scatter(1, order, drop_sorted)
    s = s.masked_fill(drop, float("-inf"))
    # repetition penalty on the seen ids
    p = penalty[:, None]
    penalised = torch.where(s < 0, s * p, s / p)
    return torch.where(seen, penalised, s)


TOPK_WIDTH = 1024  # static width of the top-k fast path (covers the default top_k=1000 plus ties)


def process_logits_topk(logits: Tensor, seen: Tensor, temperature: Tensor, top_k: Tensor,
                        top_p_threshold: Tensor, top_p_on: Tensor, penalty: Tensor,
                        width: int = TOPK_WIDTH) -> Tensor:
    """:func:`process_logits` without sorting the vocabulary: one ``topk(width)`` instead of two sorts.

    Requires every row's ``top_k <= width`` (callers fall back to :func:`process_logits` otherwise).
    Top-k is exact (the k-th value comes from the sorted top-``width`` list; ties with it are kept
    by a full-vocabulary comparison). Top-p runs over the survivors in ascending order as HF does:
    its softmax and cumulative sum see exactly the same values whenever all survivors fit in the
    ``width`` list. The one difference: if more than ``width - k`` values tie with the k-th, the
    ties beyond the list are dropped by top-p (HF would drop or keep them depending on its sort's
    tie order; they carry the smallest probability of all survivors). Shapes as :func:`process_logits`.
    """
    B, V = logits.shape
    width = min(width, V)
    s = logits / temperature[:, None]
    vals, idx = torch.topk(s, width, dim=-1, largest=True, sorted=True)  # (B, W) descending
    kth = vals.gather(1, (top_k.clamp(max=width) - 1)[:, None])  # (B, 1); clamp: idle rows in a batch
    s = s.masked_fill(s < kth, float("-inf"))
    asc = vals.masked_fill(vals < kth, float("-inf")).flip(-1)  # survivors ascending, -inf first
    cum = asc.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= top_p_threshold[:, None]
    drop_sorted[:, -1] = False
    # outside the list: only below-k values (already -inf) or tie overflow (dropped when top-p is on)
    drop = top_p_on[:, None].expand(B, V).clone()
    drop.scatter_(1, idx.flip(-1), drop_sorted & top_p_on[:, None])
    s = s.masked_fill(drop, float("-inf"))
    p = penalty[:, None]
    penalised = torch.where(s < 0, s * p, s / p)
    return torch.where(seen, penalised, s)


def hashed_uniform(seed: Tensor, step: Tensor, vocab_hash: Tensor) -> Tensor:
    """Uniform ``(B, V)`` float32 in (0, 1), a pure function of (seed, step, token id).

    ``seed``, ``step``: ``(B,)`` int64 (seed < 2**32); ``vocab_hash``: ``(V,)`` = ``hash32(arange(V))``.
    """
    key = hash32(hash32(seed ^ 0x9E3779B9) ^ (step & MASK32))  # (B,)
    bits = hash32(key[:, None] ^ vocab_hash[None, :])  # (B, V)
    return bits_to_unit(bits)


def vocab_hash(vocab: int, device: torch.device | str) -> Tensor:
    return hash32(torch.arange(vocab, dtype=torch.int64, device=device) * 0x632BE5AB & MASK32)


def sample(probs: Tensor, seed: Tensor, step: Tensor, vhash: Tensor) -> Tensor:
    """Draw one id per row of ``probs`` ``(B, V)``: ``argmax(p / E)``, ``E ~ Exp(1)``. Returns ``(B,)`` int64."""
    e = -torch.log(hashed_uniform(seed, step, vhash))
    return torch.argmax(probs / e, dim=-1)


def seed32(seed: int) -> int:
    """Fold any Python int seed into 32 bits."""
    return (seed ^ (seed >> 32)) & MASK32
