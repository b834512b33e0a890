"""Test-only stand-in for ``torchaudio`` so that upstream ``chatterbox-tts`` can be imported.

Why: upstream 0.1.7 imports torchaudio at module level, but every torchaudio wheel on PyPI
is a CUDA build whose native library will not load beside the CPU torch used here.  The
code paths our parity tests compare against (T3 inference, S3Gen inference from a saved
``conds.pt``) never call torchaudio: upstream uses it only to resample a reference wav and to
compute Kaldi fbanks for the CAMPPlus speaker encoder, i.e. when cloning a voice from audio.

This package therefore satisfies the imports and raises on *any* use, so a test that did
reach torchaudio would fail loudly instead of silently computing something different.
It is put on ``sys.path`` only by ``tests/upstream_oracle.py``; nothing in the product sees it.
"""
from __future__ import annotations

__version__ = "0.0.0+stand-in"


class TorchaudioStandInError(RuntimeError):
    """Raised when upstream code actually calls into torchaudio during a test."""


def _fail(name: str):
    raise TorchaudioStandInError(
        f"upstream called torchaudio.{name}; the oracle tests' stand-in does not implement it "
        "(only voice cloning from a wav needs torchaudio, and the tests use conds.pt)"
    )


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    _fail(name)
