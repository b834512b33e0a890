"""Audio on the wire: streaming encoders for the proto's ``AudioEncoding``s and a small WAV writer.

The models make float32 mono audio at 24 kHz, 960 samples (40 ms) per speech token. Clients may ask
for PCM16, float32 or G.711 mu-law at another rate; ``StreamEncoder`` resamples with soxr's streaming
resampler (state kept across chunks, so chunk boundaries make no clicks) and encodes each chunk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MODEL_SAMPLE_RATE = 24_000
SAMPLES_PER_TOKEN = 960
ALLOWED_SAMPLE_RATES = (8_000, 16_000, 22_050, 24_000, 44_100, 48_000)

# Values of tts_api.v1 AudioEncoding (kept here so this module does not need the generated code).
ENC_UNSPECIFIED, ENC_PCM16, ENC_FLOAT32, ENC_MULAW = 0, 1, 2, 3
ENCODING_NAMES = {ENC_PCM16: "pcm16", ENC_FLOAT32: "float32", ENC_MULAW: "mulaw"}
BYTES_PER_SAMPLE = {ENC_PCM16: 2, ENC_FLOAT32: 4, ENC_MULAW: 1}


@dataclass(frozen=True)
class AudioSpec:
    """A resolved audio format: encoding (``ENC_*``, never UNSPECIFIED) and sample rate in Hz."""

    encoding: int
    sample_rate: int


def resolve_format(encoding: int, sample_rate: int) -> AudioSpec:
    """Apply the defaults (PCM16; 24 kHz, or 8 kHz for mu-law) and check; ValueError names what is wrong."""
    if encoding == ENC_UNSPECIFIED:
        encoding = ENC_PCM16
    if encoding not in ENCODING_NAMES:
        raise ValueError(f"unknown audio encoding {encoding}; use PCM16, FLOAT32 or MULAW")
    if sample_rate == 0:
        sample_rate = 8_000 if encoding == ENC_MULAW else MODEL_SAMPLE_RATE
    if sample_rate not in ALLOWED_SAMPLE_RATES:
        raise ValueError(
            f"sample rate {sample_rate} Hz is not supported; use one of {', '.join(map(str, ALLOWED_SAMPLE_RATES))}"
        )
    return AudioSpec(encoding, sample_rate)


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] (N,) -> int16 (N,), clipped and rounded."""
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")


def mulaw_encode(x: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] (N,) -> G.711 mu-law bytes (N,) uint8 (via 16-bit PCM, as telephony does)."""
    pcm = float_to_pcm16(x).astype(np.int32)
    sign = (pcm < 0).astype(np.int32)
    mag = np.minimum(np.abs(pcm), 32635) + 0x84
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~((sign << 7) | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)


def mulaw_decode(b: np.ndarray) -> np.ndarray:
    """G.711 mu-law bytes (N,) uint8 -> int16 (N,)."""
    u = ~b.astype(np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    mag = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -mag, mag).astype("<i2")


def decode_samples(data: bytes, encoding: int) -> np.ndarray:
    """Wire bytes -> float32 samples (N,) in [-1, 1]."""
    if encoding == ENC_FLOAT32:
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if encoding == ENC_MULAW:
        return mulaw_decode(np.frombuffer(data, dtype=np.uint8)).astype(np.float32) / 32768.0
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


class StreamEncoder:
    """Turns 24 kHz float32 chunks into wire bytes of ``spec``, resampling statefully if needed."""

    def __init__(self, spec: AudioSpec):
        self.spec = spec
        self._resampler = None
        if spec.sample_rate != MODEL_SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(MODEL_SAMPLE_RATE, spec.sample_rate, 1, dtype="float32")

    def encode(self, audio: np.ndarray, last: bool = False) -> tuple[bytes, int]:
        """float32 (N,) at 24 kHz -> (bytes, samples at the output rate). ``last`` flushes the resampler."""
        audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio, last=last)
        if self.spec.encoding == ENC_FLOAT32:
            data = audio.astype("<f4").tobytes()
        elif self.spec.encoding == ENC_MULAW:
            data = mulaw_encode(audio).tobytes()
        else:
            data = float_to_pcm16(audio).tobytes()
        return data, int(audio.shape[0])


def wav_bytes(data: bytes, encoding: int, sample_rate: int) -> bytes:
    """A mono WAV file holding ``data`` (wire bytes) as PCM16, IEEE float32 or mu-law."""
    fmt_tag = {ENC_PCM16: 1, ENC_FLOAT32: 3, ENC_MULAW: 7}[encoding]
    width = BYTES_PER_SAMPLE[encoding]
    n = len(data) // width
    fmt = struct.pack("<HHIIHH", fmt_tag, 1, sample_rate, sample_rate * width, width, width * 8)
    chunks = [b"fmt " + struct.pack("<I", len(fmt)) + fmt]
    if fmt_tag != 1:  # non-PCM: extended fmt chunk plus a fact chunk, as the WAV spec asks
        fmt += struct.pack("<H", 0)
        chunks = [b"fmt " + struct.pack("<I", len(fmt)) + fmt, b"fact" + struct.pack("<II", 4, n)]
    pad = b"\x00" if len(data) % 2 else b""
    chunks.append(b"data" + struct.pack("<I", len(data)) + data + pad)
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body
