"""T3 model on the tiny preset: prefix reuse, batching, loading errors."""
from __future__ import annotations

import pytest
import torch

from token_service.t3.config import START_SPEECH, T3Config
from token_service.t3.generate import decode_step, prefill, stream_speech_tokens, text_embeds
from token_service.t3.model import KVCache, T3Model
from token_service.t3.sampling import SamplingParams
from token_service.t3.voice import VoiceConds, build_voice_prefix, prefix_embeds


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = T3Config.preset("tiny")
    model = T3Model(cfg).eval()
    with torch.no_grad():  # make embeddings/biases non-trivial
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim == 2 else 0.1)
    g = torch.Generator().manual_seed(1)
    conds = VoiceConds(torch.randn(1, 256, generator=g), torch.randint(0, 6561, (1, 375), generator=g))
    return model, conds


def test_presets():
    assert T3Config.preset("turbo").n_layer == 24 and T3Config.preset("turbo").n_embd == 1024
    assert T3Config.preset("nano").n_embd == 768 and T3Config.preset("nano").n_head == 12
    assert T3Config.preset("tiny").prefix_len == 376
    with pytest.raises(ValueError, match="unknown T3 preset 'huge'"):
        T3Config.preset("huge")


def test_from_state_dict_round_trip(tiny):
    model, _ = tiny
    sd = model.state_dict()
    assert "tfmr.wte.weight" in sd and "speech_head.bias" in sd and "tfmr.h.1.attn.c_attn.weight" in sd
    assert sd["tfmr.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D layout (in, out)
    cfg = T3Config.from_state_dict(sd)
    assert cfg == T3Config.preset("tiny")
    loaded = T3Model.from_state_dict(sd)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k])


def test_load_errors_name_the_key(tiny):
    model, _ = tiny
    sd = dict(model.state_dict())
    bad = dict(sd)
    del bad["speech_head.bias"]
    with pytest.raises(ValueError, match="speech_head.bias"):
        T3Model.from_state_dict(bad)
    bad = dict(sd)
    bad["speech_emb.weight"] = torch.zeros(10, 64)
    with pytest.raises(ValueError, match=r"speech_emb.weight.*\(10, 64\)"):
        T3Model.from_state_dict(bad, T3Config.preset("tiny"))
    with pytest.raises(ValueError, match="tfmr.wpe.weight"):
        T3Config.from_state_dict({k: v for k, v in sd.items() if k != "tfmr.wpe.weight"})


def test_bad_voice_conds_are_named(tiny):
    model, conds = tiny
    with pytest.raises(ValueError, match="cond_prompt_speech_tokens"):
        prefix_embeds(model, VoiceConds(conds.speaker_emb, conds.prompt_tokens[:, :10]))
    with pytest.raises(ValueError, match="speaker_emb"):
        prefix_embeds(model, VoiceConds(torch.zeros(1, 80), conds.prompt_tokens))


@torch.inference_mode()
def test_prefix_reuse_equals_recompute(tiny):
    model, conds = tiny
    text = torch.tensor([11, 22, 33, 50260, 44])
    prefix = build_voice_prefix(model, conds)
    n = prefix.length + len(text) + 1
    cache = KVCache(model.cfg, 3, n + 8)
    reused = prefill(model, cache, 2, prefix, text)
    # recompute: the whole [prefix | text | start] from scratch in a fresh cache
    full = torch.cat([prefix_embeds(model, conds), text_embeds(model, text)])[None]
    fresh = KVCache(model.cfg, 1, n + 8)
    hidden = model.forward_embeds(full, torch.arange(n)[None], fresh.view(slice(0, 1), n))
    recomputed = model.speech_logits(hidden[0, -1])
    torch.testing.assert_close(reused, recomputed, rtol=1e-5, atol=1e-5)
    for step in range(4):  # decode continues identically from both caches
        tok = torch.tensor([100 + step])
        a = decode_step(model, cache, 3, torch.tensor([0, 0, 100 + step]), torch.tensor([0, 0, n + step]))[2]
        b = decode_step(model, fresh, 1, tok, torch.tensor([n + step]))[0]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_batched_decode_equals_each_alone(tiny):
    model, conds = tiny
    prefix = build_voice_prefix(model, conds)
    texts = [torch.tensor([5, 6, 7]), torch.tensor([8] * 11), torch.tensor([9, 10])]
    max_len = prefix.length + 11 + 1 + 6
    batch = KVCache(model.cfg, 3, max_len)
    alone = [KVCache(model.cfg, 1, max_len) for _ in texts]
    pos = []
    for i, t in enumerate(texts):
        a = prefill(model, batch, i, prefix, t)
        b = prefill(model, alone[i], 0, prefix, t)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        pos.append(prefix.length + len(t) + 1)
    positions = torch.tensor(pos)
    for step in range(5):
        toks = torch.tensor([START_SPEECH - 1 - step, 7 * step, 3])
        batched = decode_step(model, batch, 3, toks, positions)
        for i in range(3):
            single = decode_step(model, alone[i], 1, toks[i:i + 1], positions[i:i + 1])[0]
            torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-5)
        positions = positions + 1


def test_stream_is_seeded_and_stops(tiny):
    model, conds = tiny
    prefix = build_voice_prefix(model, conds)
    p = SamplingParams(seed=3, max_new_tokens=20)
    a = list(stream_speech_tokens(model, prefix, [1, 2, 3], p))
    assert a == list(stream_speech_tokens(model, prefix, [1, 2, 3], p))
    assert len(a) <= 20 and all(0 <= t < 6561 for t in a)
    with pytest.raises(ValueError, match="text_ids is empty"):
        list(stream_speech_tokens(model, prefix, [], p))
    with pytest.raises(ValueError, match="positions"):
        list(stream_speech_tokens(model, prefix, [1] * 7000, SamplingParams(max_new_tokens=1001)))
