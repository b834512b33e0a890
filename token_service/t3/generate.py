"""Single-sequence T3 inference: prefill, decode step and an incremental token stream.

This is the plain reference path (the CLI and the parity tests use it); the engine
(``token_service.engine``) runs the same model functions over many slots at once.

Sequence layout (absolute positions, one KV-cache slot):
``[voice prefix 0..P-1 | text P..P+T-1 | start-of-speech P+T | speech tokens P+T+1 ...]``.
The first speech token is sampled from the prefill's last logits; each decode step feeds the
previous token at the next position.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from .config import SPEECH_VOCAB_VALID, START_SPEECH, STOP_SPEECH, S3GEN_SIL
from .model import KVCache, T3Model, prefill_attention_backends
from .sampling import (TOPK_WIDTH, SamplingParams, process_logits, process_logits_topk, row_values, sample, seed32,
                       vocab_hash)
from .voice import VoicePrefix


def text_embeds(model: T3Model, text_ids: Tensor) -> Tensor:
    """``[text | start-of-speech]`` embeddings ``(T + 1, C)`` for text ids ``(T,)``."""
    start = torch.tensor([START_SPEECH], device=text_ids.device)
    return torch.cat([model.text_emb(text_ids), model.speech_emb(start)], dim=0)


def required_len(prefix_len: int, n_text: int, max_new_tokens: int) -> int:
    """KV positions a sequence can occupy: prefix + text + start + every fed-back sampled token."""
    return prefix_len + n_text + 1 + max_new_tokens - 1


@torch.inference_mode()
def prefill(model: T3Model, cache: KVCache, slot: int, prefix: VoicePrefix, text_ids: Tensor) -> Tensor:
    """Copy the voice prefix into ``slot`` and run ``[text | start]``; returns the last logits ``(V,)`` float32."""
    prefix.copy_into(cache, slot)
    x = text_embeds(model, text_ids)[None]  # (1, T+1, C)
    P = prefix.length
    positions = torch.arange(P, P + x.shape[1], device=x.device)[None]
    hidden = model.forward_embeds(x.to(cache.k[0].dtype), positions, cache.view(slice(slot, slot + 1), P + x.shape[1]))
    return model.speech_logits(hidden[0, -1])


@torch.inference_mode()
def decode_step(model: T3Model, cache: KVCache, n_rows: int, tokens: Tensor, positions: Tensor,
                length: int | None = None) -> Tensor:
    """Feed ``tokens`` ``(B,)`` at ``positions`` ``(B,)`` for cache slots ``0..B-1``; returns logits ``(B, V)``.

    ``length`` bounds the attended cache positions (default: the whole cache); it must exceed
    every position.
    """
    x = model.speech_emb(tokens)[:, None].to(cache.k[0].dtype)  # (B, 1, C)
    hidden = model.forward_embeds(x, positions[:, None], cache.view(slice(0, n_rows), length))
    return model.speech_logits(hidden[:, 0])


def silence_tail(n: int = 3) -> list[int]:
    """The silence tokens upstream's ``generate`` appends after an utterance (3 × ``S3GEN_SIL``)."""
    return [S3GEN_SIL] * n


@torch.inference_mode()
def stream_speech_tokens(model: T3Model, prefix: VoicePrefix, text_ids: Sequence[int],
                         params: SamplingParams = SamplingParams()) -> Iterator[int]:
    """Yield speech tokens one by one, as upstream ``inference_turbo`` + ``generate`` would produce them.

    Stops at stop-of-speech (not yielded) or after ``params.max_new_tokens`` sampled tokens; ids
    ``>= 6561`` are dropped. No silence is appended (see :func:`silence_tail`).
    """
    cfg = model.cfg
    dev = model.speech_head.weight.device
    ids = torch.as_tensor(list(text_ids), dtype=torch.long, device=dev)
    if ids.numel() == 0:
        raise ValueError("text_ids is empty")
    need = required_len(prefix.length, ids.numel(), params.max_new_tokens)
    if need > cfg.n_positions:
        raise ValueError(f"sequence would need {need} positions (prefix {prefix.length} + text {ids.numel()} + 1 + "
                         f"{params.max_new_tokens - 1} generated), the model has {cfg.n_positions}")
    cache = KVCache(cfg, 1, need, device=dev, dtype=model.speech_head.weight.dtype)
    V = cfg.speech_vocab_size
    rv = row_values(params, V)
    f32 = dict(dtype=torch.float32, device=dev)
    temp = torch.tensor([rv["temperature"]], **f32)
    top_k = torch.tensor([rv["top_k"]], dtype=torch.long, device=dev)
    thr = torch.tensor([rv["top_p_threshold"]], **f32)
    p_on = torch.tensor([rv["top_p_on"]], device=dev)
    pen = torch.tensor([rv["penalty"]], **f32)
    seed = torch.tensor([seed32(params.resolved_seed())], dtype=torch.long, device=dev)
    vh = vocab_hash(V, dev)
    seen = torch.zeros(1, V, dtype=torch.bool, device=dev)
    seen[0, START_SPEECH] = True

    with prefill_attention_backends(dev):
        logits = prefill(model, cache, 0, prefix, ids)[None]
    pos = prefix.length + ids.numel() + 1
    for step in range(params.max_new_tokens):
        scores = (process_logits_topk if rv["top_k"] <= TOPK_WIDTH else process_logits)(
            logits, seen, temp, top_k, thr, p_on, pen)  # the engine's choice of path, for equal draws
        tok = sample(scores.softmax(-1), seed, torch.tensor([step], device=dev), vh)
        t = int(tok)
        if t == STOP_SPEECH:
            return
        if step == 0:
            seen.zero_()
        seen[0, t] = True
        if t < SPEECH_VOCAB_VALID:
            yield t
        if step + 1 == params.max_new_tokens:
            return
        logits = decode_step(model, cache, 1, tok, torch.tensor([pos], device=dev))
        pos += 1
