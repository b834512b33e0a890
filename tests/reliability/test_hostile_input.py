"""Hostile input, property-based (hypothesis), against the real tiny engines behind real servers.

Every request field and message order is drawn at random: huge, empty, control-character and
invalid-UTF-8 text, any sampling values (NaN, infinities, 0, 2^32 - 1), unknown voices and audio
formats, token ids up to 2^32 - 1, messages in any order, and messages over the size limit. Each case
must end with a clear status (OK with consistent audio, or INVALID_ARGUMENT / NOT_FOUND /
RESOURCE_EXHAUSTED with a message) within its deadline — never a hang (DEADLINE_EXCEEDED), never a
crash (INTERNAL / UNKNOWN) — and leave no stream, KV slot or vocoder session open.

Invalid UTF-8: protobuf ``string`` fields cannot carry it from a Python client (serialization fails
on the client), so the test sends hand-encoded bytes through a raw method handle.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tts_api.v1 import common_pb2, token_service_pb2, token_service_pb2_grpc, vocoder_service_pb2, vocoder_service_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CALL_TIMEOUT = 30.0  # a hang shows up as DEADLINE_EXCEEDED, which fails the test
CLEAR = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
u32 = st.integers(0, 2**32 - 1)
texts = st.one_of(
    st.sampled_from(["Hello there. ", "How are you today? ", "Fine, thanks"]),
    st.text(max_size=80),                                                   # any unicode (no surrogates)
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=40),  # controls / spaces only
    st.sampled_from(["", " ", "\n\t", "Hello there.", "Wait... what?! ", "\x00\x01\x7f", "🙂" * 5]),
    st.integers(300, 3000).map(lambda n: "ab " * n),                        # over max_text_chars (600)
)


@st.composite
def sampling(draw):
    cfg = token_service_pb2.SamplingConfig()
    for name, strat in (("temperature", floats), ("top_k", u32), ("top_p", floats), ("repetition_penalty", floats),
                        ("max_new_tokens", u32), ("seed", st.integers(0, 2**64 - 1))):
        if draw(st.booleans()):
            setattr(cfg, name, draw(strat))
    return cfg


@st.composite
def synthesis_config(draw):
    """Half the time a sane config (default voice, maybe a seed / cap), else every field at random."""
    if draw(st.booleans()):
        cfg = token_service_pb2.SynthesisConfig(voice=draw(st.sampled_from(["", "default"])))
        if draw(st.booleans()):
            cfg.sampling.seed = draw(st.integers(0, 2**64 - 1))
        if draw(st.booleans()):
            cfg.sampling.max_new_tokens = draw(u32)
        return cfg
    return token_service_pb2.SynthesisConfig(
        voice=draw(st.one_of(st.just(""), st.just("default"), st.text(max_size=20))),
        sampling=draw(sampling()),
        audio_format=common_pb2.AudioFormat(encoding=draw(st.integers(0, 12)),
                                            sample_rate_hz=draw(st.one_of(st.sampled_from([0, 8000, 16000, 24000, 48000]), u32))))


@st.composite
def synthesize_messages(draw):
    """Half the time the right shape (config, text pieces and flushes, maybe end) with hostile content;
    else any mix of config / text / flush / end / empty messages in any order."""
    req = token_service_pb2.SynthesizeRequest
    if draw(st.booleans()):
        msgs = [req(config=draw(synthesis_config()))]
        for kind in draw(st.lists(st.sampled_from(["text", "text", "flush"]), min_size=1, max_size=5)):
            msgs.append(req(text=draw(texts)) if kind == "text" else req(flush=token_service_pb2.Flush()))
        if draw(st.booleans()):
            msgs.append(req(end=common_pb2.EndOfInput()))
        return msgs
    msgs = [req(config=draw(synthesis_config()))] if draw(st.integers(0, 4)) else []
    for kind in draw(st.lists(st.sampled_from(["text", "text", "text", "flush", "end", "config", "empty"]), max_size=6)):
        if kind == "text":
            msgs.append(req(text=draw(texts)))
        elif kind == "flush":
            msgs.append(req(flush=token_service_pb2.Flush()))
        elif kind == "end":
            msgs.append(req(end=common_pb2.EndOfInput()))
        elif kind == "config":
            msgs.append(req(config=draw(synthesis_config())))
        else:
            msgs.append(req())
    return msgs


def _outcome(call_fn):
    """(code name, details, responses) of a streaming call, never raising for gRPC errors."""
    responses = []
    try:
        for r in call_fn():
            responses.append(r)
        return "OK", "", responses
    except grpc.RpcError as err:
        return err.code().name, err.details() or "", responses


def _check_synthesis(code, details, responses):
    assert code == "OK" or code in CLEAR, (code, details)
    if code != "OK":
        assert details.strip(), code
        return
    assert responses and responses[-1].WhichOneof("kind") == "summary", "an OK stream ends with its summary"
    s = responses[-1].summary
    audio = [r.audio for r in responses[:-1]]
    assert [a.sequence for a in audio] == list(range(len(audio)))
    assert s.audio_chunks == len(audio) and s.sentences >= 1


def test_synthesize_any_fields_any_order(real_pair):
    pair = real_pair(token_cfg={"max_text_chars": 600})
    with grpc.insecure_channel(pair.token.target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        seen: dict[str, int] = {}

        @SETTINGS
        @given(msgs=synthesize_messages())
        def check(msgs):
            code, details, responses = _outcome(lambda: stub.Synthesize(iter(msgs), timeout=CALL_TIMEOUT))
            _check_synthesis(code, details, responses)
            seen[code] = seen.get(code, 0) + 1
            pair.assert_idle()

        check()
        print(f"Synthesize outcomes: {seen}")
        assert "OK" in seen and "INVALID_ARGUMENT" in seen  # the search reached both sides


def test_stream_tokens_any_fields(real_pair):
    pair = real_pair(token_cfg={"max_text_chars": 600})
    with grpc.insecure_channel(pair.token.target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)

        @SETTINGS
        @given(text=texts, voice=st.one_of(st.just(""), st.text(max_size=10)), cfg=sampling())
        def check(text, voice, cfg):
            req = token_service_pb2.StreamTokensRequest(text=text, voice=voice, sampling=cfg)
            code, details, responses = _outcome(lambda: stub.StreamTokens(req, timeout=CALL_TIMEOUT))
            assert code == "OK" or code in CLEAR, (code, details)
            if code == "OK":
                ids = [t for r in responses for t in r.token_ids]
                assert ids and all(0 <= t < 6561 for t in ids) and ids[-3:] == [4299] * 3
            pair.assert_idle()

        check()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_text_bytes_invalid_utf8(real_pair):
    pair = real_pair(token_cfg={"max_text_chars": 600})
    config = token_service_pb2.SynthesizeRequest(config=token_service_pb2.SynthesisConfig()).SerializeToString()
    end = token_service_pb2.SynthesizeRequest(end=common_pb2.EndOfInput()).SerializeToString()
    with grpc.insecure_channel(pair.token.target) as ch:
        raw = ch.stream_stream("/chatterbox.tts.v1.TokenService/Synthesize", request_serializer=lambda b: b,
                               response_deserializer=token_service_pb2.SynthesizeResponse.FromString)
        seen: dict[str, int] = {}

        @SETTINGS
        @given(data=st.binary(min_size=1, max_size=64))
        def check(data):
            text = b"\x12" + _varint(len(data)) + data  # field 2 (text), length-delimited
            code, details, responses = _outcome(lambda: raw(iter([config, text, end]), timeout=CALL_TIMEOUT))
            try:
                data.decode("utf-8")
                valid = True
            except UnicodeDecodeError:
                valid = False
            if not valid:
                assert code == "INVALID_ARGUMENT" and "UTF-8" in details, (code, details)
            else:
                _check_synthesis(code, details, responses)
            seen[code] = seen.get(code, 0) + 1
            pair.assert_idle()

        check()
        assert seen.get("INVALID_ARGUMENT"), seen


@st.composite
def vocode_messages(draw):
    req = vocoder_service_pb2.VocodeRequest
    msgs = []
    if draw(st.integers(0, 4)):
        cfg = vocoder_service_pb2.VocodeConfig(voice=draw(st.one_of(st.just(""), st.just("default"), st.text(max_size=10))))
        if draw(st.booleans()):
            cfg.seed = draw(st.integers(0, 2**64 - 1))
        msgs.append(req(config=cfg))
    ids = st.one_of(st.integers(0, 6560), st.integers(0, 2**32 - 1))
    for kind in draw(st.lists(st.sampled_from(["tokens", "tokens", "tokens", "end", "config", "empty"]), max_size=5)):
        if kind == "tokens":
            msgs.append(req(tokens=vocoder_service_pb2.TokenChunk(token_ids=draw(st.lists(ids, max_size=40)))))
        elif kind == "end":
            msgs.append(req(end=common_pb2.EndOfInput()))
        elif kind == "config":
            msgs.append(req(config=vocoder_service_pb2.VocodeConfig()))
        else:
            msgs.append(req())
    return msgs


def test_vocode_any_tokens_any_order(real_pair):
    pair = real_pair()
    with grpc.insecure_channel(pair.vocoder.target) as ch:
        stub = vocoder_service_pb2_grpc.VocoderServiceStub(ch)

        @SETTINGS
        @given(msgs=vocode_messages())
        def check(msgs):
            code, details, responses = _outcome(lambda: stub.Vocode(iter(msgs), timeout=CALL_TIMEOUT))
            assert code == "OK" or code in CLEAR, (code, details)
            if code == "OK":
                sent = []
                for m in msgs[1:]:
                    if m.WhichOneof("kind") == "end":
                        break
                    sent += list(m.tokens.token_ids)
                assert all(t < 6561 for t in sent)
                assert sum(len(r.pcm_f32) for r in responses) == 4 * 960 * len(sent)
                assert responses[-1].final
            else:
                assert details.strip()
            v = pair.vocoder.wait_idle()
            assert v["active_sessions"] == 0 and v["active_streams"] == 0, v

        check()


def test_message_size_limits_on_both_servers(real_pair):
    """Both config objects carry max_message_bytes; a message over it is refused with
    RESOURCE_EXHAUSTED on either server, and both keep serving."""
    from token_service.config import TokenServiceConfig
    from tts_common.config import config_fields
    from vocoder_service.config import VocoderServiceConfig

    for cls in (TokenServiceConfig, VocoderServiceConfig):
        field = {f.name: f for f in config_fields(cls)}["max_message_bytes"]
        assert field.env == "TTS_MAX_MESSAGE_BYTES" and field.default == 4 * 1024 * 1024
    limit = 256 * 1024
    pair = real_pair(token_cfg={"max_message_bytes": limit}, vocoder_cfg={"max_message_bytes": limit})
    req = token_service_pb2.SynthesizeRequest
    with grpc.insecure_channel(pair.token.target) as ch:
        stub = token_service_pb2_grpc.TokenServiceStub(ch)
        code, details, _ = _outcome(lambda: stub.Synthesize(
            iter([req(config=token_service_pb2.SynthesisConfig()), req(text="a" * (limit + 10))]), timeout=CALL_TIMEOUT))
        assert code == "RESOURCE_EXHAUSTED" and "larger than max" in details, (code, details)
    vreq = vocoder_service_pb2.VocodeRequest
    giant = vreq(tokens=vocoder_service_pb2.TokenChunk(token_ids=[6000] * (limit // 2 + 10)))  # 2 bytes an id
    with grpc.insecure_channel(pair.vocoder.target) as ch:
        stub = vocoder_service_pb2_grpc.VocoderServiceStub(ch)
        code, details, _ = _outcome(lambda: stub.Vocode(
            iter([vreq(config=vocoder_service_pb2.VocodeConfig()), giant]), timeout=CALL_TIMEOUT))
        assert code == "RESOURCE_EXHAUSTED" and "larger than max" in details, (code, details)
    pair.assert_idle()
    with grpc.insecure_channel(pair.token.target) as ch:
        ok = _outcome(lambda: token_service_pb2_grpc.TokenServiceStub(ch).Synthesize(
            iter([req(config=token_service_pb2.SynthesisConfig()), req(text="Still fine.")]), timeout=CALL_TIMEOUT))
        _check_synthesis(*ok)
        assert ok[0] == "OK"
    pair.assert_idle()
