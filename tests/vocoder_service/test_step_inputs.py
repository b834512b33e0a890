"""How a streaming step feeds the device: first chunks through the unmasked flow, noise hashed
inside the flow / F0-source calls (what the CUDA graphs capture), one upload per group, session
constants made at open. Numbers must not change: each path is checked against the one it replaced."""
from __future__ import annotations

import pytest
import torch

from vocoder_service.s3gen import streaming
from vocoder_service.s3gen.hift import SourceNoise
from vocoder_service.s3gen.noise import MEL_STREAM, SOURCE_STREAM, PositionalNoise, hashed_normal, stream_keys
from vocoder_service.s3gen.streaming import StreamingSession, finish_batch, push_batch


@pytest.fixture(scope="module")
def toks() -> list[list[int]]:
    return torch.randint(0, 6561, (3, 120), generator=torch.Generator().manual_seed(8)).tolist()


def _count_calls(monkeypatch, flow, names):
    calls = {n: [] for n in names}
    for n in names:
        real = getattr(flow, n)

        def wrap(*a, _real=real, _n=n, **k):
            calls[_n].append(a[0].shape[0])  # batch rows
            return _real(*a, **k)
        monkeypatch.setattr(flow, n, wrap)
    return calls


def test_first_chunks_take_the_unmasked_flow_in_one_batch(tiny_model, tiny_voice, toks, monkeypatch):
    calls = _count_calls(monkeypatch, tiny_model.flow, ["forward_noised", "forward_padded_noised"])
    a, b, c = (StreamingSession(tiny_model, tiny_voice, seed=i) for i in range(3))
    push_batch([a, b], [toks[0][:7], toks[1][:7]])  # two first chunks: one unmasked batch of 2
    assert calls == {"forward_noised": [2], "forward_padded_noised": []}
    push_batch([a, c], [toks[0][7:40], toks[2][:7]])  # a's later chunks (padded) + c's first chunk (unmasked)
    assert calls["forward_noised"] == [2, 1] and calls["forward_padded_noised"] and set(calls["forward_padded_noised"]) == {1}
    short = StreamingSession(tiny_model, tiny_voice, seed=5)
    short.push(toks[2][:5])  # 5 tokens: no step yet
    n_padded = len(calls["forward_padded_noised"])
    finish_batch([short])  # a final window narrower than a first chunk's: the one padded window
    assert len(calls["forward_padded_noised"]) == n_padded + 1 and calls["forward_noised"] == [2, 1]
    for s in (a, b, c, short):
        s.close()


def test_first_chunk_paths_give_the_same_audio(tiny_model, tiny_voice, toks):
    # first chunks unmasked (default), every window exact (pad_windows off), noise hashed on the host
    # (the eager flow and F0 / source path): the same audio, within float32 rounding
    outs = []
    for cfg in (streaming.StreamConfig(), streaming.StreamConfig(pad_windows=False),
                streaming.StreamConfig(noise_on_host=True)):
        sessions = [StreamingSession(tiny_model, tiny_voice, seed=i, config=cfg) for i in range(2)]
        first = push_batch(sessions, [t[:7] for t in toks[:2]])
        rest = push_batch(sessions, [t[7:60] for t in toks[:2]])
        ends = finish_batch(sessions)
        outs.append([torch.cat(x) for x in zip(first, rest, ends)])
    for got in outs[1:]:
        for g, ref in zip(got, outs[0]):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)


def test_noise_inside_the_flow_equals_noise_passed_in(tiny_model, tiny_voice):
    m, v = tiny_model, tiny_voice
    ratio, tp, fp = m.cfg.token_mel_ratio, v.n_prompt_tokens, v.n_prompt_frames
    g = torch.Generator().manual_seed(1)
    T = tp + 9
    tok = torch.randint(0, m.cfg.vocab_size, (2, T), generator=g)
    tok[:, :tp] = v.prompt_token[0]
    spk = m.flow.speaker(v.embedding).expand(2, -1)
    feat = v.prompt_feat.expand(2, -1, -1)
    pn = [PositionalNoise(s, m.cfg.n_mels) for s in (3, 4)]
    prompt_noise = torch.stack([p.mel(0, fp) for p in pn])
    index = torch.tensor([[p.key(MEL_STREAM) for p in pn], [fp + 6, fp + 10]]).T.contiguous()  # (B, 2)
    noise = torch.cat([prompt_noise, hashed_normal(index[:, 0], index[:, 1], ratio * T - fp, m.cfg.n_mels)], dim=2)
    with torch.inference_mode():
        assert torch.equal(m.flow.forward_noised(tok, feat, spk, prompt_noise, index, drop_tail_frames=6),
                           m.flow(tok, feat, spk, noise, drop_tail_frames=6))
        lens, mel_lens = torch.tensor([T, T - 2]), torch.tensor([ratio * (T - 3), ratio * (T - 2)])
        assert torch.equal(m.flow.forward_padded_noised(tok, feat, spk, prompt_noise, index, lens, mel_lens),
                           m.flow.forward_padded(tok, feat, spk, noise, lens, mel_lens))


def test_f0_source_equals_its_parts(tiny_model):
    m = tiny_model
    hop, H = m.cfg.hop_samples, m.cfg.hift_harmonics + 1
    g = torch.Generator().manual_seed(2)
    mel = torch.randn(2, m.cfg.n_mels, 12, generator=g) - 4
    phase = torch.rand(2, H, 1, generator=g) * 6 - 3
    cycles0 = torch.rand(2, H, generator=g)
    index = torch.tensor([[PositionalNoise(7, harmonics=H).key(SOURCE_STREAM), hop * 5], [11, hop * 9]])  # (B, 2)
    with torch.inference_mode():
        src, cyc = m.mel2wav.f0_source(mel, phase, index, cycles0, skip_frames=3, end_sample=7 * hop)
        f0 = m.mel2wav.f0_at_samples(mel)[:, 3 * hop:]
        noise = hashed_normal(index[:, 0], index[:, 1], f0.size(1), H)
        ref, _ = m.mel2wav.m_source(f0, SourceNoise(phase, noise), cycles0)
        assert torch.equal(src, ref)
        assert torch.equal(cyc, streaming._cycles(m, f0, cycles0)[:, :, 7 * hop - 1])
        _, same = m.mel2wav.f0_source(mel, phase, index, cycles0, skip_frames=3, end_sample=0)
        assert torch.equal(same, cycles0)


def test_one_upload_per_group(tiny_model, tiny_voice, toks, monkeypatch):
    uploads = []
    real = streaming._to_device
    monkeypatch.setattr(streaming, "_to_device", lambda parts, dev: uploads.append(len(parts)) or real(parts, dev))
    s = StreamingSession(tiny_model, tiny_voice, seed=1)
    s.push(toks[0][:7])
    assert uploads == [2, 1]  # first chunk: tokens + noise index; HiFT: noise index
    s.push(toks[0][7:40])
    assert uploads[2:] and all(u in (4, 1) for u in uploads[2:])  # padded: tokens, lengths x2, noise index
    s.close()


def test_to_device_packs_parts_in_one_buffer():
    parts = [torch.arange(6).view(2, 3), torch.tensor([7, 8]), torch.tensor([[1], [2]])]
    out = streaming._to_device(parts, "cpu")
    for o, p in zip(out, parts):
        assert o.shape == p.shape and torch.equal(o, p)
    assert len({o.untyped_storage().data_ptr() for o in out}) == 1


def test_session_constants_are_made_at_open(tiny_model, tiny_voice):
    a, b = (StreamingSession(tiny_model, tiny_voice, seed=s) for s in (21, 22))
    st = a.state
    assert st.prompt_noise is not None and st.prompt_noise.shape == (tiny_model.cfg.n_mels, tiny_voice.n_prompt_frames)
    assert torch.equal(st.prompt_noise, st.noise.mel(0, tiny_voice.n_prompt_frames))
    assert torch.equal(st.prompt_tokens_cpu, tiny_voice.prompt_token[0].cpu())
    assert st.prompt_tokens_cpu is b.state.prompt_tokens_cpu  # one host copy per voice
    for stream in (MEL_STREAM, SOURCE_STREAM):
        assert st.noise.key(stream) == int(stream_keys(torch.tensor([21]), stream)[0])
    a.close()
    b.close()


class _BatchFirstGraphs:
    """Stands in for ``model.graphs`` on CPU: checks what ``CudaGraphCache`` relies on, that every
    tensor input of a graphed call has the batch on dim 0 (the cache pads to buckets and slices there)."""

    def __init__(self, model):
        self.rows: list[int] = []
        fns = {"flow": model.flow, "flow_padded": model.flow.forward_padded, "flow_noised": model.flow.forward_noised,
               "flow_padded_noised": model.flow.forward_padded_noised, "f0": model.mel2wav.f0_at_samples,
               "f0_source": model.mel2wav.f0_source, "decode": model.mel2wav.decode}
        for name, fn in fns.items():
            setattr(self, name, self._check(name, fn))

    def _check(self, name, fn):
        def run(*args, **consts):
            B = args[0].size(0)
            assert all(a.size(0) == B for a in args), (name, [tuple(a.shape) for a in args])
            self.rows.append(B)
            return fn(*args, **consts)
        return run


@pytest.mark.parametrize("config", [streaming.StreamConfig(), streaming.StreamConfig(noise_on_host=True),
                                    streaming.StreamConfig(pad_windows=False)], ids=["default", "host", "exact"])
def test_graphed_inputs_are_batch_first(tiny_model, tiny_voice, toks, monkeypatch, config):
    graphs = _BatchFirstGraphs(tiny_model)
    monkeypatch.setattr(tiny_model, "graphs", graphs, raising=False)
    sessions = [StreamingSession(tiny_model, tiny_voice, seed=i, config=config) for i in range(3)]
    push_batch(sessions[:1], [toks[0][:20]])
    push_batch(sessions, [t[20:27] if i == 0 else t[:7] for i, t in enumerate(toks)])  # 1 later + 2 first chunks
    push_batch(sessions, [t[27:50] for t in toks])
    finish_batch(sessions)
    assert 3 in graphs.rows or 2 in graphs.rows, graphs.rows  # batched calls were seen
