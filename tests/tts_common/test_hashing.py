"""The shared 32-bit mix equals a plain-Python lowbias32 (the numbers both services' draws rest on)."""
import torch

from tts_common.hashing import MASK32, hash32


def _reference(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def test_hash32_equals_reference_over_the_whole_range():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]  # products past 2**63 wrap correctly
    got = hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_reference(x) for x in xs]
    assert all(0 <= g <= MASK32 for g in got)
