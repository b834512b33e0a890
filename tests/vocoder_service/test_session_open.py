"""Opening a streaming session (``new_state``, issue 6): per-voice constants cached, per-seed ones made
from host ints with no host -> device copy, and every number equal to what the open made before."""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tts_common.hashing import bits_to_unit, hash32
from vocoder_service.s3gen import streaming
from vocoder_service.s3gen.config import S3GenConfig
from vocoder_service.s3gen.model import S3GenModel, VoiceCond
from vocoder_service.s3gen.noise import (MEL_STREAM, PHASE_STREAM, SOURCE_STREAM, PositionalNoise, hashed_normal,
                                         stream_key, stream_keys)
from vocoder_service.s3gen.streaming import new_state

from tests.vocoder_service.helpers import random_voice

SEEDS = [0, 1, 21, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 123456789012345, 2**62 + 3, 2**63 - 1]


def test_host_key_equals_the_tensor_hash():
    seeds = torch.tensor(SEEDS, dtype=torch.int64)
    for stream in (MEL_STREAM, SOURCE_STREAM, PHASE_STREAM, 7):
        on_tensors = stream_keys(seeds, stream).tolist()
        assert [stream_key(s, stream) for s in SEEDS] == on_tensors
        assert [PositionalNoise(s).key(stream) for s in SEEDS] == on_tensors
        for s in SEEDS[:4]:
            keys = PositionalNoise(s)._keys(stream, "cpu")
            assert keys.dtype == torch.int64 and keys.shape == (1,)
            assert torch.equal(keys, stream_keys(torch.tensor([s]), stream))


def _old_mel(seed: int, start: int, end: int, n_mels: int = 80) -> torch.Tensor:
    """The flow noise as the open made it before (seed and start copied in as tensors)."""
    keys = stream_keys(torch.tensor([seed], dtype=torch.int64), MEL_STREAM)
    return hashed_normal(keys, torch.tensor([start]), max(0, end - start), n_mels)[0]


def _old_phase(seed: int, harmonics: int) -> torch.Tensor:
    keys = stream_keys(torch.tensor([seed], dtype=torch.int64), PHASE_STREAM)
    counter = torch.arange(harmonics, dtype=torch.int64).view(1, -1)
    u = bits_to_unit(hash32(hash32(counter ^ keys.view(-1, 1))))[0]
    return (u * (2 * math.pi) - math.pi).view(-1, 1)


def test_noise_from_host_keys_is_bit_identical():
    for seed in SEEDS:
        pn = PositionalNoise(seed, 80, 9)
        assert torch.equal(pn.mel(0, 40), _old_mel(seed, 0, 40))
        assert torch.equal(pn.mel(17, 33), _old_mel(seed, 17, 33))
        assert torch.equal(pn.source_phase(), _old_phase(seed, 9))
        old_src = hashed_normal(stream_keys(torch.tensor([seed]), SOURCE_STREAM), torch.tensor([960]), 50, 9)[0]
        assert torch.equal(pn.source_noise(960, 1010), old_src)


def test_state_equals_the_uncached_open(tiny_model, tiny_voice):
    cfg = tiny_model.cfg
    st = new_state(tiny_model, tiny_voice, 5)
    with torch.inference_mode():
        spk = tiny_model.flow.speaker(tiny_voice.embedding)
    assert torch.equal(st.spk, spk)
    assert torch.equal(st.prompt_noise, _old_mel(5, 0, tiny_voice.n_prompt_frames, cfg.n_mels))
    assert torch.equal(st.phase, _old_phase(5, cfg.hift_harmonics + 1))
    assert torch.equal(st.prompt_tokens_cpu, tiny_voice.prompt_token[0])
    assert st.cycles.shape == (cfg.hift_harmonics + 1,) and not st.cycles.any()
    assert st.mel_hist.shape == (cfg.n_mels, 0) and st.src_hist.shape == (1, 0)


def test_per_voice_constants_are_shared(tiny_model, tiny_voice):
    a, b = new_state(tiny_model, tiny_voice, 1), new_state(tiny_model, tiny_voice, 2)
    assert a.spk is b.spk  # one speaker projection per voice
    assert a.voice.prompt_feat is b.voice.prompt_feat and a.prompt_tokens_cpu is b.prompt_tokens_cpu
    assert not torch.equal(a.prompt_noise, b.prompt_noise)  # per seed, not shared
    other = random_voice(tiny_model.cfg, seed=3)
    c = new_state(tiny_model, other, 1)
    assert c.spk is not a.spk and not torch.equal(c.spk, a.spk)


def test_speaker_cache_follows_the_weights(tiny_voice):
    torch.manual_seed(1)
    model = S3GenModel(S3GenConfig.preset("tiny")).eval()
    first = new_state(model, tiny_voice, 1).spk
    with torch.no_grad():  # weights changed in place: the cached projection is stale
        model.flow.spk_embed_affine_layer.bias.add_(1.0)
    again = new_state(model, tiny_voice, 1).spk
    assert again is not first and torch.allclose(again, first + 1.0, atol=1e-6)
    torch.manual_seed(2)
    other = S3GenModel(S3GenConfig.preset("tiny")).eval()  # another model, same voice tensors
    with torch.inference_mode():
        assert torch.equal(new_state(other, tiny_voice, 1).spk, other.flow.speaker(tiny_voice.embedding))


def test_device_copies_are_made_once_per_voice():
    """``_voice_on`` on a second device ('meta' stands in for the GPU): one copy per tensor, reused by
    later sessions, made again after an in-place change; the host prompt is the device prompt's host copy."""
    g = torch.Generator().manual_seed(0)
    voice = VoiceCond(torch.randint(0, 100, (1, 6), generator=g), torch.randn(1, 12, 8, generator=g),
                      torch.randn(1, 4, generator=g))
    meta = torch.device("meta")
    a, b = streaming._voice_on(voice, meta), streaming._voice_on(voice, meta)
    assert a.prompt_feat.device == meta and a.prompt_token.device == meta
    assert a.prompt_token is b.prompt_token and a.prompt_feat is b.prompt_feat and a.embedding is b.embedding
    assert streaming._prompt_tokens_host(a) is not None
    assert torch.equal(streaming._prompt_tokens_host(a), voice.prompt_token[0])  # no read back from the device
    same = streaming._voice_on(voice, torch.device("cpu"))
    assert same.prompt_feat is voice.prompt_feat  # already there: no copy
    voice.prompt_feat.mul_(2)  # changed in place: copied again
    assert streaming._voice_on(voice, meta).prompt_feat is not a.prompt_feat


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket).replace("aten.", "")
        if name == "_to_copy" and kwargs.get("device") is not None:
            name = "_to_copy(device)"  # a transfer, not a dtype cast
        self.ops.append(name)
        return func(*args, **kwargs)


def test_open_makes_no_tensor_from_host_data(tiny_model, tiny_voice):
    """A later session's open: no ``torch.tensor`` (``lift_fresh``, a pageable host -> device copy on
    CUDA), no copy / read-back, no speaker projection (cached); only fills and the noise kernels."""
    new_state(tiny_model, tiny_voice, 1)  # the voice's first open fills the caches
    with _Ops() as mode:
        new_state(tiny_model, tiny_voice, 9)
    ops = set(mode.ops)
    assert not ops & {"lift_fresh", "_to_copy(device)", "copy_", "_local_scalar_dense", "addmm", "linear", "mm"}, ops
    assert "full" in ops  # the keys / start position: fills
    assert len(mode.ops) < 120  # 98 at the time of writing (was 256 with the per-session keys and speaker)


def test_speaker_cache_with_the_exported_graphs_flow(tiny_model, tiny_voice):
    """The onnxruntime / TensorRT engines stream over ``GraphS3Gen``: its flow keeps the speaker weights
    as ``spk_weight`` / ``spk_bias``; the cache follows them too."""
    from types import SimpleNamespace

    from vocoder_service.engine.graph_s3gen import GraphFlow

    layer = tiny_model.flow.spk_embed_affine_layer
    flow = GraphFlow(tiny_model.cfg, None, layer.weight.detach().clone(), layer.bias.detach().clone())
    model = SimpleNamespace(flow=flow)
    first = streaming._speaker(model, tiny_voice.embedding)
    assert streaming._speaker(model, tiny_voice.embedding) is first
    with torch.inference_mode():
        assert torch.allclose(first, tiny_model.flow.speaker(tiny_voice.embedding), atol=1e-6)
    flow.spk_bias.add_(1.0)
    assert torch.allclose(streaming._speaker(model, tiny_voice.embedding), first + 1.0, atol=1e-6)
