"""Wire audio: formats, mu-law against the G.711 reference points, streaming resampling, WAV."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tts_common.audio import (
    ENC_FLOAT32, ENC_MULAW, ENC_PCM16, AudioSpec, StreamEncoder, decode_samples, mulaw_decode, mulaw_encode,
    resolve_format, wav_bytes,
)


def test_resolve_format_defaults_and_errors():
    assert resolve_format(0, 0) == AudioSpec(ENC_PCM16, 24000)
    assert resolve_format(ENC_MULAW, 0) == AudioSpec(ENC_MULAW, 8000)
    with pytest.raises(ValueError, match="12345 Hz"):
        resolve_format(ENC_PCM16, 12345)
    with pytest.raises(ValueError, match="encoding 7"):
        resolve_format(7, 0)


def test_mulaw_g711_points_and_roundtrip():
    # G.711: silence -> 0xFF, full-scale positive -> 0x80, full-scale negative -> 0x00
    assert mulaw_encode(np.array([0.0, 1.0, -1.0], np.float32)).tolist() == [0xFF, 0x80, 0x00]
    x = np.linspace(-1, 1, 2001, dtype=np.float32)
    y = mulaw_decode(mulaw_encode(x)).astype(np.float32) / 32768
    assert np.max(np.abs(y - x) / np.maximum(np.abs(x), 1e-2)) < 0.07  # ~log-uniform quantisation error


def test_stream_encoder_chunks_equal_one_shot():
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(24000) * 0.1).astype(np.float32)
    enc = StreamEncoder(AudioSpec(ENC_FLOAT32, 16000))
    parts = [enc.encode(audio[i:i + 3000], last=i + 3000 >= len(audio)) for i in range(0, len(audio), 3000)]
    got = np.frombuffer(b"".join(p[0] for p in parts), "<f4")
    assert sum(p[1] for p in parts) == len(got) == 16000
    import soxr

    np.testing.assert_allclose(got, soxr.resample(audio, 24000, 16000), atol=1e-5)
    pcm = StreamEncoder(AudioSpec(ENC_PCM16, 24000)).encode(audio)[0]
    np.testing.assert_allclose(decode_samples(pcm, ENC_PCM16), audio, atol=1 / 32000)


def test_wav_header():
    data = np.zeros(10, "<i2").tobytes()
    wav = wav_bytes(data, ENC_PCM16, 24000)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    fmt_tag, channels, rate = struct.unpack("<HHI", wav[20:28])
    assert (fmt_tag, channels, rate) == (1, 1, 24000) and wav.endswith(data)
    assert struct.unpack("<H", wav_bytes(b"\x00" * 8, ENC_FLOAT32, 24000)[20:22])[0] == 3
