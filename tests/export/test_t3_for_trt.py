"""T3ForTRT: unified vocabulary, baked voice, logits equal to the T3 engine's (float32)."""
from __future__ import annotations

import pytest
import torch

from export.t3_for_trt import (T3ForTRTConfig, convert_checkpoint, create_t3_for_trt,
                               load_converted_checkpoint, process_logits)
from export.validate import t3_engine_logits
from export.voice_prefix import compute_voice_prefix, load_t3_state_dict
from token_service.t3.config import T3Config

TEXT = [5, 100, 2000, 50275, 0]
SPEECH = [17, 4299, 6560, 0]


@pytest.fixture(scope="module")
def tiny(tiny_t3_dir):
    sd, cfg = load_t3_state_dict(tiny_t3_dir)
    prefix = compute_voice_prefix(sd, tiny_t3_dir, "default", cfg)
    return sd, cfg, prefix, create_t3_for_trt(sd, prefix, cfg)


def unified(cfg: T3ForTRTConfig) -> torch.Tensor:
    return torch.tensor([TEXT + [cfg.start_speech_id] + [cfg.speech_offset + s for s in SPEECH]])


def test_config_vocab_ranges():
    c = T3ForTRTConfig.from_t3_config(T3Config.preset("turbo"))
    assert (c.total_vocab_size, c.speech_offset, c.start_speech_id, c.stop_speech_id, c.prefix_len) == \
        (56839, 50276, 50276 + 6561, 50276 + 6562, 376)
    n = T3ForTRTConfig.from_t3_config(T3Config.preset("nano"))
    assert (n.n_layer, n.n_embd, n.n_head, n.total_vocab_size) == (12, 768, 12, 56839)


def test_config_defaults_follow_t3_turbo_and_round_trip():
    turbo = T3Config.preset("turbo")
    assert T3ForTRTConfig() == T3ForTRTConfig.from_t3_config(turbo)
    for preset in ("turbo", "nano", "tiny"):
        t3 = T3Config.preset(preset)
        back = T3ForTRTConfig.from_t3_config(t3).to_t3_config()
        assert back == T3Config(**{**t3.__dict__, "weights_file": back.weights_file}), preset


def test_logits_equal_t3_engine(tiny, tiny_t3_dir):
    sd, cfg, prefix, model = tiny
    with torch.no_grad():
        logits, _ = model(unified(model.cfg))
    ref = t3_engine_logits(tiny_t3_dir, "default", TEXT, SPEECH)  # after start and after each speech token
    got = logits[0, len(TEXT):, model.cfg.speech_offset:]
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-5, rel
    assert torch.isneginf(logits[..., : model.cfg.text_vocab_size]).all()  # text is never sampled


def test_incremental_cache_matches_full_forward(tiny):
    model = tiny[3]
    ids = unified(model.cfg)
    with torch.no_grad():
        full, _ = model(ids)
        a, past = model(ids[:, :3], use_cache=True)
        b, past = model(ids[:, 3:7], past_key_values=past, use_cache=True)
        c, _ = model(ids[:, 7:], past_key_values=past, use_cache=True)
    off = model.cfg.speech_offset
    torch.testing.assert_close(torch.cat([a, b, c], 1)[..., off:], full[..., off:], rtol=1e-5, atol=1e-5)


def test_voice_prefix_not_set_and_bad_ids(tiny):
    sd, cfg = tiny[0], tiny[1]
    bare = create_t3_for_trt(sd, None, cfg)
    with pytest.raises(RuntimeError, match="voice prefix not set"):
        bare(torch.tensor([[1, 2]]))
    bare(torch.tensor([[1, 2]]), prepend_voice_prefix=False)  # allowed without a prefix
    with pytest.raises(ValueError, match=r"\[0, 56839\)"):
        tiny[3](torch.tensor([[56839]]))
    with pytest.raises(ValueError, match="voice prefix must be"):
        bare.set_voice_prefix(torch.zeros(3, 7))


def test_convert_and_load_roundtrip(tiny_t3_dir, tiny, tmp_path):
    model = tiny[3]
    convert_checkpoint(tiny_t3_dir, tmp_path)
    loaded = load_converted_checkpoint(tmp_path)
    assert loaded.cfg == model.cfg and torch.equal(loaded.voice_prefix, model.voice_prefix)
    ids = unified(model.cfg)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_generate_speech_ids_reproducible(tiny):
    model = tiny[3]
    a = model.generate(TEXT, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    b = model.generate(TEXT, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    assert a == b and 0 < len(a) <= 12 and all(0 <= t < 6562 for t in a)
    greedy = model.generate(TEXT, max_new_tokens=5, top_k=1, repetition_penalty=1.0)
    with torch.no_grad():
        first = model(torch.tensor([TEXT + [model.cfg.start_speech_id]]))[0][0, -1, model.cfg.speech_offset:]
    assert greedy[0] == int(first.argmax()) or int(first.argmax()) == 6562


@pytest.mark.upstream
def test_process_logits_equals_hf_processors():
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    torch.manual_seed(0)
    logits = torch.randn(6563) * 3
    hist = [6561, 5, 5, 100]
    procs = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(1000), TopPLogitsWarper(0.95),
                                 RepetitionPenaltyLogitsProcessor(1.2)])
    ref = procs(torch.tensor([hist]), logits[None].clone())[0]
    torch.testing.assert_close(process_logits(logits, hist, 0.8, 1000, 0.95, 1.2), ref, rtol=0, atol=0)
