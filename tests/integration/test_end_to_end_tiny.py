"""Acceptance: the real engines (tiny demo checkpoint) behind real servers on loopback.

960 samples per speech token, audio equal to the in-process engines' audio for the same seed, one
trace across client / token service / vocoder service, and the failure cases with their statuses,
each followed by a normal request and a check that no KV slot or vocoder session leaked.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from harness import MemoryTelemetry
from service_pair import real_engines

from tts_api.v1 import common_pb2, token_service_pb2, token_service_pb2_grpc, vocoder_service_pb2, vocoder_service_pb2_grpc
from tts_client.client import make_config, synthesis_requests, synthesize

pytestmark = pytest.mark.integration

TEXT = "Hello there, friend. This is a streaming test!"
MAX_NEW = 40  # speech tokens per sentence: keeps CPU time small


@pytest.fixture(scope="module")
def engines(demo_tiny_dir):
    yield from real_engines(demo_tiny_dir, kv_slots=4)


@pytest.fixture
def pair(make_pair, engines):
    token_engine, vocoder_engine = engines
    return make_pair(token_engine=token_engine, vocoder_engine=vocoder_engine, make_sampling=None)


def _reference(token_engine, vocoder_engine, text, seed):
    """In process, no gRPC: sentences -> T3 (seed + i) -> tokens + 3 silence -> one vocoder session."""
    from token_service.engine import SamplingParams
    from token_service.sentences import split_sentences

    async def run():
        session = vocoder_engine.open_session("default", seed=seed)
        audio, tokens = [], []
        for i, sentence in enumerate(split_sentences(text)):
            ids = token_engine.tokenize(sentence)
            async for chunk in token_engine.generate("default", ids, SamplingParams(seed=seed + i, max_new_tokens=MAX_NEW)):
                tokens += chunk
                audio.append(await session.push(chunk))
            tokens += [4299] * 3
            audio.append(await session.push([4299] * 3))
        audio.append(await session.finish())
        session.close()
        return np.concatenate(audio), tokens

    return asyncio.run(run())


def _cfg(seed=5, **kw):
    cfg = make_config(seed=seed, max_new_tokens=MAX_NEW, **kw)
    return cfg


def test_end_to_end_equals_in_process_engines(pair, engines):
    client = MemoryTelemetry("tts-client")
    with grpc.insecure_channel(pair.token.target) as ch:
        r = synthesize(ch, TEXT, _cfg(encoding="float32"), stream_text=True, piece_interval=0.01,
                       telemetry=client.telemetry, timeout=120)
    ref_audio, ref_tokens = _reference(*engines, TEXT, 5)
    s = r.summary
    assert s.sentences == 2
    assert s.speech_tokens == len(ref_tokens)
    assert s.audio_samples == r.samples == 960 * s.speech_tokens
    np.testing.assert_array_equal(r.audio(), ref_audio)
    assert np.abs(r.audio()).max() > 0
    pair.assert_idle()

    # one trace id over the client's, the token service's and the vocoder service's spans
    spans = (list(client.spans.get_finished_spans()) + list(pair.token.tel.spans.get_finished_spans())
             + list(pair.vocoder.tel.spans.get_finished_spans()))
    assert {s.context.trace_id for s in spans} == {int(r.trace_id, 16)}
    names = {s.name for s in spans}
    assert {"tts.client.synthesize", "tts.Synthesize", "t3.prefill", "t3.decode", "vocoder.call",
            "vocoder.Vocode", "vocoder.chunk"} <= names


def test_stream_tokens_match_synthesis_tokens(pair, engines):
    _, ref_tokens = _reference(*engines, TEXT, 9)
    with grpc.insecure_channel(pair.token.target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        req = token_service_pb2.StreamTokensRequest(
            text=TEXT, sampling=token_service_pb2.SamplingConfig(seed=9, max_new_tokens=MAX_NEW))
        got = [t for c in stub.StreamTokens(req, timeout=60) for t in c.token_ids]
    assert got == ref_tokens
    pair.assert_idle()


@pytest.mark.parametrize("text, code, words", [
    ("", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("word " * 4100, grpc.StatusCode.INVALID_ARGUMENT, "too long"),  # > TTS_MAX_TEXT_CHARS (20000)
])
def test_bad_text(pair, text, code, words):
    with grpc.insecure_channel(pair.token.target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            synthesize(ch, text, _cfg(), timeout=60)
        assert info.value.code() == code and words in info.value.details(), info.value.details()
        pair.assert_idle()
        assert synthesize(ch, "Fine again.", _cfg(), timeout=60).summary.audio_samples > 0
    pair.assert_idle()


def test_unknown_voice_and_bad_config(pair):
    with grpc.insecure_channel(pair.token.target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            synthesize(ch, TEXT, _cfg(voice="nobody"), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nobody" in info.value.details()
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Synthesize(iter([token_service_pb2.SynthesizeRequest(text="Hi.")]), timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "config" in info.value.details()
        pair.assert_idle()
        assert synthesize(ch, "Fine again.", _cfg(), timeout=60).summary.audio_samples > 0
    pair.assert_idle()


def test_out_of_range_tokens_to_vocoder(pair):
    req = vocoder_service_pb2.VocodeRequest
    with grpc.insecure_channel(pair.vocoder.target) as ch:
        stub = vocoder_service_pb2_grpc.VocoderServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Vocode(iter([req(config=vocoder_service_pb2.VocodeConfig(seed=1)),
                                   req(tokens=vocoder_service_pb2.TokenChunk(token_ids=[10, 6561]))]), timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "6561" in info.value.details()
        pair.assert_idle()
        out = list(stub.Vocode(iter([req(config=vocoder_service_pb2.VocodeConfig(seed=1)),
                                     req(tokens=vocoder_service_pb2.TokenChunk(token_ids=[10, 20, 30])),
                                     req(end=common_pb2.EndOfInput())]), timeout=60))
        assert sum(len(o.pcm_f32) for o in out) == 3 * 960 * 4
    pair.assert_idle()


def test_client_cancel_mid_stream(pair):
    with grpc.insecure_channel(pair.token.target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        call = stub.Synthesize(synthesis_requests(TEXT * 3, make_config(seed=1, max_new_tokens=300)), timeout=120)
        next(call)
        call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        pair.assert_idle()
        assert synthesize(ch, "Fine again.", _cfg(), timeout=60).summary.audio_samples > 0
    pair.assert_idle()


def test_vocoder_dies_mid_stream(pair):
    with grpc.insecure_channel(pair.token.target) as ch:
        got_audio = threading.Event()
        errors = []

        def run():
            try:
                synthesize(ch, TEXT * 3, make_config(seed=1, max_new_tokens=300), timeout=120,
                           on_chunk=lambda c: got_audio.set())
            except grpc.RpcError as err:
                errors.append(err)

        t = threading.Thread(target=run)
        t.start()
        assert got_audio.wait(60)
        pair.vocoder.stop()
        t.join(60)
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors
        assert "vocoder service" in errors[0].details()
        stats = pair.token.wait_idle()
        assert stats["active"] == 0 and stats["active_streams"] == 0, stats
        assert pair.vocoder.engine.stats()["active_sessions"] == 0
