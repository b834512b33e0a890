"""The service pair on loopback with fake engines: protocol, statuses, cancellation, limits, drain.

Fake engines (tests/integration/fakes.py) keep these tests fast and let them control timing; the
same servers run with the real tiny engines in test_end_to_end_tiny.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
from fakes import FakeTokenEngine, fake_vocoder_engine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import MemoryTelemetry, RunningService

from tts_api.v1 import common_pb2, token_service_pb2, token_service_pb2_grpc, vocoder_service_pb2, vocoder_service_pb2_grpc
from tts_client.client import make_config, synthesis_requests, synthesize
from tts_common.audio import decode_samples, float_to_pcm16

pytestmark = pytest.mark.integration

TEXT = "Hello there. This is a test of streaming speech!"


def _error(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def _reqs(*items):
    return iter(items)


def _req(**kw):
    return token_service_pb2.SynthesizeRequest(**kw)


def test_end_to_end_960_samples_per_token_and_order(make_pair):
    pair = make_pair()
    with grpc.insecure_channel(pair.token.target) as ch:
        r = synthesize(ch, TEXT, make_config(encoding="float32", seed=1), stream_text=True, piece_interval=0.01)
    s = r.summary
    assert s.sentences == 2
    assert s.speech_tokens > 6 and s.audio_samples == 960 * s.speech_tokens == r.samples
    assert [c.sequence for c in r.chunks] == list(range(len(r.chunks)))
    offsets = np.cumsum([0] + [len(c.data) // 4 for c in r.chunks])[:-1]
    assert [c.sample_offset for c in r.chunks] == offsets.tolist()
    assert {c.sample_rate_hz for c in r.chunks} == {24000}
    assert [c.sentence_index for c in r.chunks] == sorted(c.sentence_index for c in r.chunks)
    assert r.chunks[-1].sentence_index == 1
    assert s.time_to_first_audio_seconds > 0 and s.real_time_factor > 0
    pair.assert_idle()


def _reference_audio(token_engine, vocoder_engine, text, seed, sampling_cls):
    """The same synthesis in process: tokenize, generate (seed + i per sentence), push chunks + silence."""
    from token_service.sentences import split_sentences

    async def run():
        session = vocoder_engine.open_session("default", seed=seed)
        out = []
        for i, sentence in enumerate(split_sentences(text)):
            ids = token_engine.tokenize(sentence)
            async for tokens in token_engine.generate("default", ids, sampling_cls(seed=seed + i)):
                out.append(await session.push(tokens))
            out.append(await session.push([4299] * 3))
        out.append(await session.finish())
        session.close()
        return np.concatenate(out)

    return asyncio.run(run())


def test_audio_equals_in_process_engines(make_pair):
    from fakes import FakeSampling

    pair = make_pair()
    with grpc.insecure_channel(pair.token.target) as ch:
        r = synthesize(ch, TEXT, make_config(encoding="float32", seed=7), stream_text=True, piece_interval=0.01)
        pcm = synthesize(ch, TEXT, make_config(encoding="pcm16", seed=7))
        other_seed = synthesize(ch, TEXT, make_config(encoding="float32", seed=8))
    ref = _reference_audio(FakeTokenEngine(), fake_vocoder_engine(), TEXT, 7, FakeSampling)
    np.testing.assert_array_equal(r.audio(), ref)
    assert pcm.data == float_to_pcm16(ref).tobytes()
    assert not np.array_equal(other_seed.audio(), ref)
    pair.assert_idle()


def test_mulaw_8k_and_resampled_pcm(make_pair):
    pair = make_pair()
    with grpc.insecure_channel(pair.token.target) as ch:
        ref = synthesize(ch, TEXT, make_config(encoding="float32", seed=1))
        mu = synthesize(ch, TEXT, make_config(encoding="mulaw", seed=1))
        p16 = synthesize(ch, TEXT, make_config(encoding="pcm16", sample_rate=16000, seed=1))
    assert mu.sample_rate == 8000 and mu.summary.sample_rate_hz == 8000
    assert abs(len(mu.data) - ref.samples / 3) <= 2  # 1 byte a sample at a third of the rate
    assert abs(p16.samples - ref.samples * 2 / 3) <= 2
    # mu-law keeps the waveform: compare with the reference decimated by soxr
    import soxr

    want = soxr.resample(ref.audio(), 24000, 8000)
    got = decode_samples(mu.data, 3)
    n = min(len(want), len(got))
    assert np.corrcoef(want[:n], got[:n])[0, 1] > 0.95


def test_one_trace_across_three_processes(make_pair):
    pair = make_pair()
    client = MemoryTelemetry("tts-client")
    with grpc.insecure_channel(pair.token.target) as ch:
        r = synthesize(ch, TEXT, make_config(seed=1), telemetry=client.telemetry, timeout=30)
    pair.assert_idle()
    c_spans = client.spans.get_finished_spans()
    t_spans = pair.token.tel.spans.get_finished_spans()
    v_spans = pair.vocoder.tel.spans.get_finished_spans()
    names = {s.name for s in c_spans} | {s.name for s in t_spans} | {s.name for s in v_spans}
    for want in ("tts.client.synthesize", "tts.Synthesize", "t3.sentence", "t3.prefill", "t3.decode",
                 "vocoder.call", "vocoder.Vocode", "vocoder.chunk", "vocoder.finish"):
        assert want in names, (want, names)
    trace_ids = {s.context.trace_id for s in list(c_spans) + list(t_spans) + list(v_spans)}
    assert trace_ids == {int(r.trace_id, 16)}
    by_name = {s.name: s for s in list(c_spans) + list(t_spans) + list(v_spans)}
    assert by_name["tts.Synthesize"].parent.span_id == by_name["tts.client.synthesize"].context.span_id
    assert by_name["vocoder.Vocode"].parent.span_id == by_name["vocoder.call"].context.span_id
    # the client's deadline reached the vocoder service (gRPC does not pass it on by itself)
    assert 20 < by_name["vocoder.Vocode"].attributes["rpc.deadline_remaining_s"] <= 31  # gRPC rounds up a little
    # hand-made metrics were recorded
    assert pair.token.tel.metric("tts.time_to_first_audio")
    assert pair.token.tel.metric("tts.real_time_factor")
    assert pair.token.tel.metric("tts.t3.tokens_per_second")


def test_list_voices_stream_tokens_health_reflection(make_pair):
    pair = make_pair()
    with grpc.insecure_channel(pair.token.target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        voices = stub.ListVoices(common_pb2.ListVoicesRequest())
        assert [v.name for v in voices.voices] == ["default", "other"] and voices.default_voice == "default"
        chunks = list(stub.StreamTokens(token_service_pb2.StreamTokensRequest(text=TEXT, voice="other")))
        ids = [t for c in chunks for t in c.token_ids]
        assert all(0 <= t < 6561 for t in ids) and ids[-3:] == [4299] * 3
        assert {c.sentence_index for c in chunks} == {0, 1}
        code, msg = _error(lambda: list(stub.StreamTokens(token_service_pb2.StreamTokensRequest(text=" "))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in msg
    for target, service in ((pair.token.target, "chatterbox.tts.v1.TokenService"),
                            (pair.vocoder.target, "chatterbox.tts.v1.VocoderService")):
        with grpc.insecure_channel(target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", service):
                resp = health.Check(health_pb2.HealthCheckRequest(service=name))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            listed = {s.name for s in resp.list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= listed
    pair.assert_idle()


@pytest.mark.parametrize(
    "requests, code, words",
    [
        ([_req(config=token_service_pb2.SynthesisConfig()), _req(end=common_pb2.EndOfInput())],
         grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ([_req(config=token_service_pb2.SynthesisConfig()), _req(text="  \n "), _req(end=common_pb2.EndOfInput())],
         grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ([_req(config=token_service_pb2.SynthesisConfig()), _req(text="x" * 3000)],
         grpc.StatusCode.INVALID_ARGUMENT, "too long"),
        ([_req(config=token_service_pb2.SynthesisConfig()), _req(text="word " * 200)],
         grpc.StatusCode.INVALID_ARGUMENT, "too long"),
        ([_req(config=token_service_pb2.SynthesisConfig(voice="nobody")), _req(text="Hi.")],
         grpc.StatusCode.NOT_FOUND, "nobody"),
        ([_req(text="Hello.")], grpc.StatusCode.INVALID_ARGUMENT, "first Synthesize message must be a config"),
        ([], grpc.StatusCode.INVALID_ARGUMENT, "first Synthesize message must be a config"),
        ([_req(config=token_service_pb2.SynthesisConfig(sampling=token_service_pb2.SamplingConfig(temperature=-1)))],
         grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ([_req(config=token_service_pb2.SynthesisConfig(sampling=token_service_pb2.SamplingConfig(top_p=1.5)))],
         grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ([_req(config=token_service_pb2.SynthesisConfig(audio_format=common_pb2.AudioFormat(sample_rate_hz=12345)))],
         grpc.StatusCode.INVALID_ARGUMENT, "12345"),
        ([_req(config=token_service_pb2.SynthesisConfig(audio_format=common_pb2.AudioFormat(encoding=9)))],
         grpc.StatusCode.INVALID_ARGUMENT, "encoding"),
        ([_req(config=token_service_pb2.SynthesisConfig()), _req(config=token_service_pb2.SynthesisConfig())],
         grpc.StatusCode.INVALID_ARGUMENT, "config sent twice"),
        ([_req(config=token_service_pb2.SynthesisConfig()), token_service_pb2.SynthesizeRequest()],
         grpc.StatusCode.INVALID_ARGUMENT, "empty Synthesize message"),
    ],
    ids=["no-text", "blank-text", "over-stream-limit", "over-tokenizer-limit", "unknown-voice", "text-first",
         "nothing", "bad-temperature", "bad-top-p", "bad-rate", "bad-encoding", "config-twice", "empty-message"],
)
def test_bad_requests_get_clear_status_and_leak_nothing(make_pair, requests, code, words):
    pair = make_pair(token_cfg={"max_text_chars": 2000})
    with grpc.insecure_channel(pair.token.target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        got, msg = _error(lambda: list(stub.Synthesize(iter(requests), timeout=10)))
        assert got == code, msg
        assert words in msg, msg
        pair.assert_idle()
        ok = synthesize(ch, "Still working.", make_config(seed=1), timeout=10)  # serves normally afterwards
        assert ok.summary.audio_samples > 0
    pair.assert_idle()


def _vocode(target, requests, timeout=10):
    with grpc.insecure_channel(target) as ch:
        return list(vocoder_service_pb2_grpc.VocoderServiceStub(ch).Vocode(iter(requests), timeout=timeout))


def _vreq(**kw):
    return vocoder_service_pb2.VocodeRequest(**kw)


def test_vocoder_direct_and_its_errors(make_pair):
    pair = make_pair()
    target = pair.vocoder.target
    cfg = vocoder_service_pb2.VocodeConfig(voice="default", seed=3)
    out = _vocode(target, [_vreq(config=cfg), _vreq(tokens=vocoder_service_pb2.TokenChunk(token_ids=[1, 2, 3])),
                           _vreq(tokens=vocoder_service_pb2.TokenChunk(token_ids=[4299] * 3))])
    assert sum(len(r.pcm_f32) // 4 for r in out) == 6 * 960 and out[-1].final
    assert [r.sample_offset for r in out] == np.cumsum([0] + [len(r.pcm_f32) // 4 for r in out])[:-1].tolist()
    cases = [
        ([_vreq(config=cfg), _vreq(tokens=vocoder_service_pb2.TokenChunk(token_ids=[5, 7000]))],
         grpc.StatusCode.INVALID_ARGUMENT, "7000"),
        ([_vreq(tokens=vocoder_service_pb2.TokenChunk(token_ids=[5]))], grpc.StatusCode.INVALID_ARGUMENT, "config"),
        ([_vreq(config=vocoder_service_pb2.VocodeConfig(voice="ghost"))], grpc.StatusCode.NOT_FOUND, "ghost"),
        ([_vreq(config=cfg), _vreq(config=cfg)], grpc.StatusCode.INVALID_ARGUMENT, "config sent twice"),
    ]
    for requests, code, words in cases:
        got, msg = _error(lambda: _vocode(target, requests))
        assert got == code and words in msg, (got, msg)
        pair.assert_idle()


def test_vocoder_down_gives_unavailable(make_pair):
    pair = make_pair(vocoder_target="127.0.0.1:1")  # nothing listens there
    with grpc.insecure_channel(pair.token.target) as ch:
        code, msg = _error(lambda: synthesize(ch, TEXT, make_config(), timeout=20))
    assert code == grpc.StatusCode.UNAVAILABLE and "vocoder service at 127.0.0.1:1" in msg, msg
    pair.assert_idle()


def test_vocoder_dies_mid_stream_then_recovers(make_pair):
    pair = make_pair(vocoder_engine=fake_vocoder_engine(step_delay=0.02))
    port = pair.vocoder.port
    first_audio = threading.Event()
    with grpc.insecure_channel(pair.token.target) as ch:
        errors = []

        def run():
            try:
                synthesize(ch, TEXT * 4, make_config(), timeout=30, on_chunk=lambda c: first_audio.set())
            except grpc.RpcError as err:
                errors.append((err.code(), err.details()))

        t = threading.Thread(target=run)
        t.start()
        assert first_audio.wait(10)
        pair.vocoder.stop()  # the vocoder process goes away mid-stream
        t.join(20)
        assert errors and errors[0][0] == grpc.StatusCode.UNAVAILABLE, errors
        assert "vocoder service" in errors[0][1]
        tok = pair.token.wait_idle()
        assert tok["active"] == 0 and tok["active_streams"] == 0, tok
        # a vocoder comes back on the same address: the token service recovers without a restart
        pair.vocoder = RunningService("vocoder", fake_vocoder_engine(), {"listen": f"127.0.0.1:{port}"})
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    ok = synthesize(ch, "Back again.", make_config(), timeout=10)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert ok.summary.audio_samples > 0
            pair.assert_idle()
        finally:
            pair.vocoder.stop()


def test_client_cancel_frees_kv_slot_and_vocoder_session(make_pair):
    engine = FakeTokenEngine(step_delay=0.02)
    pair = make_pair(token_engine=engine)
    with grpc.insecure_channel(pair.token.target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        call = stub.Synthesize(synthesis_requests(TEXT * 4, make_config()))
        next(call)  # audio is flowing: a KV slot and a vocoder session are held
        assert engine.stats()["active"] == 1
        assert pair.vocoder.stats()["active_sessions"] == 1
        call.cancel()
        code, _ = _error(lambda: list(call))
        assert code == grpc.StatusCode.CANCELLED
        pair.assert_idle()
        assert synthesize(ch, "Next one.", make_config(), timeout=10).summary.audio_samples > 0
    pair.assert_idle()


def test_deadline_exceeded_frees_everything(make_pair):
    pair = make_pair(token_engine=FakeTokenEngine(step_delay=0.05))
    with grpc.insecure_channel(pair.token.target) as ch:
        code, _ = _error(lambda: synthesize(ch, TEXT * 4, make_config(), timeout=0.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        pair.assert_idle()
        assert synthesize(ch, "Next one.", make_config(), timeout=10).summary.audio_samples > 0


def test_stream_limit_refuses_at_once_and_spares_admitted_streams(make_pair):
    pair = make_pair(token_engine=FakeTokenEngine(step_delay=0.02), token_cfg={"max_streams": 1},
                     vocoder_cfg={"max_streams": 1})
    with grpc.insecure_channel(pair.token.target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        first = stub.Synthesize(synthesis_requests(TEXT, make_config()))
        next(first)
        t0 = time.monotonic()
        code, msg = _error(lambda: synthesize(ch, "Second.", make_config(), timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 of 1" in msg and "TTS_MAX_STREAMS" in msg, msg
        assert time.monotonic() - t0 < 2
        # the vocoder's own limit, seen directly
        code, msg = _error(lambda: _vocode(pair.vocoder.target, [_vreq(config=vocoder_service_pb2.VocodeConfig())]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "vocoder" in msg
        rest = list(first)
        assert rest[-1].WhichOneof("kind") == "summary"
    pair.assert_idle()
    assert pair.token.stats()["refused_streams"] == 1


def test_drain_finishes_in_flight_and_refuses_new(make_pair):
    pair = make_pair(token_engine=FakeTokenEngine(step_delay=0.02))
    with grpc.insecure_channel(pair.token.target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        call = stub.Synthesize(synthesis_requests(TEXT, make_config()))
        next(call)
        fut = asyncio.run_coroutine_threadsafe(pair.token.server.drain(10), pair.token.thread.loop)
        time.sleep(0.2)
        code, _ = _error(lambda: synthesize(ch, "New.", make_config(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
        rest = list(call)  # the in-flight stream completes
        assert rest[-1].WhichOneof("kind") == "summary"
        fut.result(15)


def test_tts_client_cli(make_pair, tmp_path, capsys):
    from tts_client.cli import main

    pair = make_pair()
    out = tmp_path / "x.wav"
    assert main(["--target", pair.token.target, "synthesize", TEXT, "-o", str(out), "--stream-text",
                 "--format", "mulaw", "--seed", "1"]) == 0
    wav = out.read_bytes()
    assert wav[:4] == b"RIFF" and wav[20:22] == b"\x07\x00"  # WAVE_FORMAT_MULAW
    assert "8000 Hz" in capsys.readouterr().out
    assert main(["--target", pair.token.target, "voices"]) == 0
    assert capsys.readouterr().out.splitlines() == ["default  (default)", "other"]
    assert main(["--target", pair.token.target, "synthesize", "Hi.", "--voice", "ghost", "-o", str(out)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_invalid_utf8_and_message_size_limit(make_pair):
    pair = make_pair(token_cfg={"max_message_bytes": 1000})
    cfg = _req(config=token_service_pb2.SynthesisConfig()).SerializeToString()
    bad_utf8 = b"\x12\x02\xff\xfe"  # field 2 (text), 2 bytes that are not UTF-8
    big = _req(text="a" * 5000).SerializeToString()
    with grpc.insecure_channel(pair.token.target) as ch:
        raw = ch.stream_stream("/chatterbox.tts.v1.TokenService/Synthesize", request_serializer=lambda b: b,
                               response_deserializer=token_service_pb2.SynthesizeResponse.FromString)
        code, msg = _error(lambda: list(raw(iter([cfg, bad_utf8]), timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in msg
        code, msg = _error(lambda: list(raw(iter([cfg, big]), timeout=10)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in msg
        pair.assert_idle()
        assert synthesize(ch, "Fine.", make_config(), timeout=10).summary.audio_samples > 0


def test_gathered_token_messages_same_audio_fewer_vocoder_calls(make_pair):
    # the fake T3 yields 1 token a step every 2 ms; gathering 8 tokens per message (waiting at most
    # 50 ms) must give the same audio with far fewer vocoder engine calls
    def run(**token_cfg):
        vocoder = fake_vocoder_engine()
        pair = make_pair(token_engine=FakeTokenEngine(chunk=1, step_delay=0.002), vocoder_engine=vocoder,
                         token_cfg=token_cfg)
        with grpc.insecure_channel(pair.token.target) as ch:
            r = synthesize(ch, TEXT, make_config(encoding="float32", seed=3))
        pair.assert_idle()
        return r.audio(), vocoder.stats()["steps"], r.summary.speech_tokens

    plain, plain_steps, n = run()
    gathered, gathered_steps, n2 = run(vocoder_min_tokens=8, vocoder_max_wait_ms=50)
    np.testing.assert_array_equal(gathered, plain)
    assert n == n2 and plain_steps > n / 2  # one call per token (or close) without gathering
    assert gathered_steps <= n / 8 + 6, (gathered_steps, n)  # ~8 tokens a call (+ sentence ends, finish)
