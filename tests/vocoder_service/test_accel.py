"""The S3Gen fast path (``vocoder_service.s3gen.accel``) on CPU: each piece equals the reference
within a stated tolerance. The CUDA-graph part is in test_accel_cuda.py (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from vocoder_service.s3gen import S3GenModel, StreamingSession
from vocoder_service.s3gen.accel import CudaGraphCache, parse_dtype, prepare_s3gen
from vocoder_service.s3gen.encoder import _relative_position_table, relative_position_table
from vocoder_service.s3gen.hift import overlap_add_istft



def fresh(model: S3GenModel) -> S3GenModel:
    """A new instance with the same weights. Not ``copy.deepcopy``: a deep copy shares the
    parametrized conv classes, and folding the copy's weight norm would break the original."""
    m = S3GenModel(model.cfg)
    m.load_state_dict(model.state_dict())
    return m.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
def tiny(tiny_model, tiny_voice):
    return tiny_model, tiny_voice


def test_parse_dtype():
    assert parse_dtype("auto") is torch.float32
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="unknown S3Gen dtype 'int8'"):
        parse_dtype("int8")


def test_overlap_add_istft_equals_torch_istft():
    g = torch.Generator().manual_seed(0)
    n_fft, hop = 16, 4
    window = torch.hann_window(n_fft, periodic=True)
    spec = torch.complex(torch.randn(3, n_fft // 2 + 1, 57, generator=g), torch.randn(3, n_fft // 2 + 1, 57, generator=g))
    ref = torch.istft(spec, n_fft, hop, n_fft, window=window)
    ours = overlap_add_istft(spec, n_fft, hop, window)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_position_table_cache_is_the_same_table():
    a = relative_position_table(37, 16)
    assert torch.equal(a, _relative_position_table(37, 16))
    assert relative_position_table(37, 16) is a  # cached
    assert relative_position_table(37, 16, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_fold_and_fp32_prepare_keep_the_numbers(tiny):
    model, voice = tiny
    fast = prepare_s3gen(fresh(model), dtype="auto")
    tok = torch.randint(0, model.cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    ref = model.synthesize(tok, voice, seed=4)
    got = fast.synthesize(tok, voice, seed=4)
    assert rel(got, ref) <= 1e-5  # weight-norm folding: same weights, rounding only


def test_graph_safe_istft_in_hift(tiny):
    model, voice = tiny
    fast = prepare_s3gen(fresh(model))
    fast.mel2wav.graph_safe_istft = True
    tok = torch.randint(0, model.cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(2))
    assert rel(fast.synthesize(tok, voice, seed=1), model.synthesize(tok, voice, seed=1)) <= 1e-5


def test_bf16_flow_close_to_fp32(tiny):
    """bf16 flow (HiFT fp32) on CPU: mel within 5 % relative L2 of fp32 on the tiny model."""
    model, voice = tiny
    fast = prepare_s3gen(fresh(model), dtype="bfloat16")
    assert fast.flow.encoder_proj.weight.dtype == torch.bfloat16
    assert fast.mel2wav.conv_pre.weight.dtype == torch.float32
    tok = torch.randint(0, model.cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(3))
    mel32 = model.tokens_to_mel(tok, voice, seed=0)
    mel16 = fast.tokens_to_mel(tok, voice, seed=0)
    assert mel16.dtype == torch.float32 and mel16.shape == mel32.shape
    err = rel(mel16, mel32)
    print(f"bf16 mel rel err {err:.2e}")
    assert 0 < err <= 0.05


def test_bf16_streaming_runs_and_keeps_lengths(tiny):
    model, voice = tiny
    fast = prepare_s3gen(fresh(model), dtype="bfloat16")
    tok = torch.randint(0, model.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    outs = []
    for ref_model, store in ((model, []), (fast, outs)):
        s = StreamingSession(ref_model, voice, seed=3)
        for i in range(0, 40, 6):
            store.append(s.push(tok[i:i + 6]))
        store.append(s.finish())
        if ref_model is model:
            ref = torch.cat(store)
    got = torch.cat(outs)
    assert got.dtype == torch.float32 and got.numel() == ref.numel() == 40 * 960
    assert rel(got, ref) <= 0.2  # audio of a bf16 flow: same waveform up to small deviations


def test_mask_none_equals_all_ones_mask(tiny):
    model, _ = tiny
    est = model.flow.decoder.estimator
    g = torch.Generator().manual_seed(5)
    B, C, T = 2, model.cfg.n_mels, 30
    x, mu, cond = (torch.randn(B, C, T, generator=g) for _ in range(3))
    spk = torch.randn(B, C, generator=g)
    t, r = torch.tensor([0.0]), torch.tensor([0.5])
    with torch.inference_mode():
        a = est(x, torch.ones(B, 1, T), mu, t, r, spk, cond)
        b = est(x, None, mu, t, r, spk, cond)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_prepare_rejects_graphs_without_cuda(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="CUDA device"):
        prepare_s3gen(fresh(model), cuda_graphs=True)


def test_graph_cache_runs_eagerly_on_cpu():
    calls = []
    cache = CudaGraphCache(lambda x, k=1: calls.append(k) or x * k, "f")
    assert torch.equal(cache(torch.ones(3), k=2), torch.full((3,), 2.0))
    assert calls == [2] and cache.stats()["graphs"] == 0


def _cfg(demo_tiny_dir, **kw):
    from vocoder_service.config import VocoderServiceConfig

    cfg = VocoderServiceConfig(model_dir=str(demo_tiny_dir), device="cpu", **kw)
    cfg.validate()
    return cfg


def test_load_engine_applies_dtype(demo_tiny_dir, monkeypatch):
    import asyncio

    import vocoder_service.s3gen.accel as accel
    from vocoder_service.engine.loader import load_engine

    seen = []
    real = accel.prepare_s3gen
    monkeypatch.setattr(accel, "prepare_s3gen", lambda m, **kw: seen.append(real(m, **kw)) or m)
    engine = load_engine(_cfg(demo_tiny_dir, dtype="bfloat16"))
    assert seen[0].flow.encoder_proj.weight.dtype == torch.bfloat16
    assert seen[0].mel2wav.conv_post.weight.dtype == torch.float32
    try:
        async def run():
            s = engine.open_session("", seed=0)
            a = await s.push(list(range(1, 12)))
            b = await s.finish()
            s.close()
            return a.size + b.size
        assert asyncio.run(run()) == 11 * 960
    finally:
        engine.shutdown()


def test_load_engine_rejects_bad_settings(demo_tiny_dir):
    from tts_common.config import ConfigError
    from vocoder_service.engine.loader import load_engine

    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device"):
        load_engine(_cfg(demo_tiny_dir, cuda_graphs=True))


def test_chunk_tokens_setting_sets_the_step_size(demo_tiny_dir):
    """``TTS_CHUNK_TOKENS`` reaches every session's StreamConfig: with 10, the chunks grow 4, 8, 10."""
    import asyncio

    from tts_common.config import ConfigError
    from vocoder_service.engine.loader import load_engine

    engine = load_engine(_cfg(demo_tiny_dir, chunk_tokens=10))
    try:
        async def run():
            s = engine.open_session("", seed=0)
            sizes = [(await s.push([5] * n)).size for n in (7, 8, 10)]  # 4 + 3 look-ahead, then 8, then 10
            s.close()
            return sizes
        # the first step keeps its last frames back for the cross-fade; later steps return exactly their
        # chunk (the default 25 would need 16 + 3 tokens for a third step: no audio for the third push)
        assert asyncio.run(run())[1:] == [8 * 960, 10 * 960]
    finally:
        engine.shutdown()
    with pytest.raises(ConfigError, match="chunk_tokens"):
        _cfg(demo_tiny_dir, chunk_tokens=0)


def test_graph_batch_must_be_a_bucket(tiny_model):
    from vocoder_service.s3gen.accel import prepare_s3gen

    with pytest.raises(ValueError, match="graph_batch"):
        prepare_s3gen(tiny_model, graph_batch=3)
