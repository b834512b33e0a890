"""Full-size Turbo T3 vs upstream chatterbox-tts 0.1.7 on the demo Turbo folder (CPU, float32)."""
from __future__ import annotations

import pytest
import torch

from token_service.t3.config import START_SPEECH, STOP_SPEECH
from token_service.t3.generate import decode_step, prefill, stream_speech_tokens
from token_service.t3.model import KVCache
from token_service.t3.sampling import SamplingParams
from token_service.t3.voice import build_voice_prefix, prefix_embeds

pytestmark = [pytest.mark.upstream, pytest.mark.fullsize]

TEXT = [40, 1842, 340, 13, 50258, 2514, 318, 257, 1332, 11, 703, 13]  # arbitrary ids incl. an added token


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _upstream_cond(upstream_turbo_t3):
    from tests.upstream_oracle import upstream_module

    T3Cond = upstream_module("models.t3.modules.cond_enc").T3Cond
    _, speaker, prompt = upstream_turbo_t3
    return T3Cond(speaker_emb=speaker.clone(), cond_prompt_speech_tokens=prompt.clone(), emotion_adv=None)


@torch.inference_mode()
def test_prefix_embeds_match_upstream_conditioning(upstream_turbo_t3, our_turbo_t3, our_turbo_voice):
    t3u, speaker, prompt = upstream_turbo_t3
    ref = t3u.prepare_conditioning(_upstream_cond(upstream_turbo_t3))[0]
    assert torch.equal(our_turbo_voice.speaker_emb, speaker) and torch.equal(our_turbo_voice.prompt_tokens, prompt)
    ours = prefix_embeds(our_turbo_t3, our_turbo_voice)
    assert ours.shape == ref.shape == (376, 1024)
    assert _rel(ours, ref) <= 1e-6


@torch.inference_mode()
def test_prefill_and_32_decode_steps_logits_match_upstream(upstream_turbo_t3, our_turbo_t3, our_turbo_voice):
    t3u, speaker, prompt = upstream_turbo_t3
    text = torch.tensor([TEXT])
    start = torch.full((1, 1), START_SPEECH)
    embeds, _ = t3u.prepare_input_embeds(t3_cond=_upstream_cond(upstream_turbo_t3), text_tokens=text,
                                         speech_tokens=start, cfg_weight=0.0)
    out = t3u.tfmr(inputs_embeds=embeds, use_cache=True)
    past = out.past_key_values
    ref_logits = t3u.speech_head(out[0][:, -1])  # (1, V)

    model = our_turbo_t3
    prefix = build_voice_prefix(model, our_turbo_voice)
    P = prefix.length
    cache = KVCache(model.cfg, 2, P + len(TEXT) + 1 + 40)
    ours = prefill(model, cache, 1, prefix, text[0])  # slot 1: slots are independent
    errs = [_rel(ours, ref_logits[0])]
    pos = P + len(TEXT) + 1
    g = torch.Generator().manual_seed(5)
    for _ in range(32):
        # follow a sampled (not greedy) path so the tokens vary; both models get the same token
        tok = torch.multinomial(torch.softmax(ref_logits[0], -1), 1, generator=g)
        out = t3u.tfmr(inputs_embeds=t3u.speech_emb(tok[None]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        ref_logits = t3u.speech_head(out[0][:, -1])
        tokens = torch.tensor([0, int(tok)])  # row 0 is an idle slot
        logits = decode_step(model, cache, 2, tokens, torch.tensor([0, pos]))
        errs.append(_rel(logits[1], ref_logits[0]))
        pos += 1
    print("max rel err prefill + 32 steps:", max(errs))
    assert max(errs) <= 1e-4, errs


def test_greedy_64_tokens_match_upstream_inference_turbo(upstream_turbo_t3, our_turbo_t3, our_turbo_voice):
    t3u, speaker, prompt = upstream_turbo_t3
    text = torch.tensor([TEXT])
    ref = t3u.inference_turbo(_upstream_cond(upstream_turbo_t3), text, top_k=1, max_gen_len=63)
    ref = [t for t in ref[0].tolist() if t < 6561]
    prefix = build_voice_prefix(our_turbo_t3, our_turbo_voice)
    ours = list(stream_speech_tokens(our_turbo_t3, prefix, TEXT, SamplingParams(top_k=1, max_new_tokens=64)))
    print("greedy tokens:", ours[:16], "… distinct:", len(set(ours)))
    assert len(ref) == 64 and STOP_SPEECH not in ref
    assert ours == ref
