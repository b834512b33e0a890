"""Offline parity with upstream ``S3Gen(meanflow=True).inference(..., n_cfm_timesteps=2)`` (CPU, fp32).

Weights and the built-in voice come from the demo turbo folder (``demo_turbo_dir``) when that
fixture exists; otherwise upstream's own random initialisation and a random voice with the shapes
of ``conds.pt``. Upstream draws its noise from the global RNG; the test replays the same draws
(in upstream's order) and hands them to our model explicitly.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.upstream_oracle import upstream_module
from vocoder_service.s3gen.hift import SourceNoise
from vocoder_service.s3gen.model import S3GenModel, VoiceCond

from tests.vocoder_service.helpers import max_rel_err, random_voice

pytestmark = [pytest.mark.upstream, pytest.mark.fullsize]


@pytest.fixture(scope="session")
def turbo_pair(request):
    """(upstream S3Gen, our S3GenModel, gen dict, VoiceCond) on identical weights."""
    S3Gen = upstream_module("models.s3gen").S3Gen
    try:
        model_dir = request.getfixturevalue("demo_turbo_dir")
    except pytest.FixtureLookupError:
        model_dir = None
    if model_dir is not None:
        from vocoder_service.s3gen.loading import load_vocoder
        from tts_common.checkpoint import ModelFolder

        ours, voices = load_vocoder(model_dir)
        folder = ModelFolder.open(model_dir)
        st = folder.s3gen_state()
        up = S3Gen(meanflow=True)
        up.load_state_dict({**st.model, **st.skipped}, strict=True)
        voice = voices["default"]
    else:
        torch.manual_seed(1234)
        up = S3Gen(meanflow=True)
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():  # upstream's init leaves biases at 0 and norms at 1: randomise them
            for name, p in up.named_parameters():
                if p.dim() == 1 and not name.endswith("alpha") and name.startswith(("flow.", "mel2wav.")):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        ours = S3GenModel()
        skipped = ours.load_s3gen_state(up.state_dict())
        assert skipped and all(k.startswith(("tokenizer.", "speaker_encoder.")) for k in skipped)
        voice = random_voice(ours.cfg, n_prompt=24, seed=3)
    gen = {"prompt_token": voice.prompt_token, "prompt_token_len": torch.tensor([voice.n_prompt_tokens]),
           "prompt_feat": voice.prompt_feat, "prompt_feat_len": None, "embedding": voice.embedding}
    return up.eval(), ours.eval(), gen, voice


def test_offline_matches_upstream(turbo_pair):
    up, ours, gen, voice = turbo_pair
    g = torch.Generator().manual_seed(5)
    tokens = torch.cat([torch.randint(0, 6561, (27,), generator=g), torch.tensor([4299, 4299, 4299])])
    T, Tp = tokens.numel(), voice.n_prompt_tokens
    seed = 2024

    torch.manual_seed(seed)
    with torch.inference_mode():
        mel_up = up.flow_inference(tokens, ref_dict=dict(gen), n_cfm_timesteps=2, finalize=True)
    torch.manual_seed(seed)
    with torch.inference_mode():
        wav_up, _ = up.inference(speech_tokens=tokens, ref_dict=dict(gen), n_cfm_timesteps=2)

    # replay upstream's draws: flow_inference noise (token frames), decoder randn_like (all frames),
    # then the HiFT source: uniform start phases, per-sample noise
    torch.manual_seed(seed)
    token_noise = torch.randn(1, 80, 2 * T)
    flow_noise = torch.randn(1, 80, 2 * (Tp + T))
    flow_noise[..., 2 * Tp:] = token_noise
    phase = torch.distributions.Uniform(-math.pi, math.pi).sample((1, 9, 1))
    src_noise = torch.randn(1, 9, 2 * T * 480)

    mel = ours.tokens_to_mel(tokens, voice, noise=flow_noise)
    assert mel.shape == mel_up.shape == (1, 80, 2 * T)
    print(f"mel max rel err {max_rel_err(mel, mel_up):.2e}")
    assert max_rel_err(mel, mel_up) <= 1e-4

    wav = ours.synthesize(tokens, voice, flow_noise=flow_noise, source=SourceNoise(phase, src_noise))
    assert wav.shape == (T * 960,) and wav_up.shape == (1, T * 960)
    print(f"wav max rel err {max_rel_err(wav, wav_up[0]):.2e}")
    assert max_rel_err(wav, wav_up[0]) <= 1e-4
    # the HiFT stage alone on upstream's mel (isolates the vocoder from flow differences)
    wav_h = ours.mel_to_wav(mel_up, SourceNoise(phase, src_noise))
    assert max_rel_err(wav_h[0], wav_up[0]) <= 1e-4
