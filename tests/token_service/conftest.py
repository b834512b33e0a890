"""Fixtures for the token-service tests: the demo Turbo T3, loaded once by upstream and by us."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def upstream_turbo_t3(demo_turbo_dir):
    """Upstream's T3 built and loaded exactly as ``ChatterboxTurboTTS.from_local`` does (Turbo
    hyper-parameters, strict ``load_state_dict``, ``del tfmr.wte``) from the demo Turbo folder, and
    the folder's voice as upstream loads it (``Conditionals.load``).

    Returns ``(t3, speaker_emb (1,256), prompt_tokens (1,375))``.
    """
    from safetensors.torch import load_file

    from tests.upstream_oracle import upstream_module

    t3_mod = upstream_module("models.t3.t3")
    cfg_mod = upstream_module("models.t3.modules.t3_config")
    tts = upstream_module("tts_turbo")
    hp = cfg_mod.T3Config(text_tokens_dict_size=50276)
    hp.llama_config_name = "GPT2_medium"
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    t3 = t3_mod.T3(hp)
    t3.load_state_dict(load_file(demo_turbo_dir / "t3_turbo_v1.safetensors"))
    del t3.tfmr.wte
    t3.eval()
    conds = tts.Conditionals.load(demo_turbo_dir / "conds.pt")
    return t3, conds.t3.speaker_emb.clone(), conds.t3.cond_prompt_speech_tokens.clone()


@pytest.fixture(scope="session")
def our_turbo_t3(demo_turbo_dir):
    from token_service.t3.loader import load_t3

    return load_t3(demo_turbo_dir).drop_unused()


@pytest.fixture(scope="session")
def our_turbo_voice(demo_turbo_dir):
    from token_service.t3.loader import load_voice_conds_all

    return load_voice_conds_all(demo_turbo_dir)["default"]
