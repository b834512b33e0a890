"""Session fixtures shared by all tests: demo model folders, generated once and cached.

``demo_turbo_dir`` / ``demo_nano_dir`` / ``demo_tiny_dir`` are folders written by
``export.demo_checkpoint`` (random weights, upstream's layout), cached under
``.cache/test-demo/<preset>-seed<seed>-<hash>`` (git-ignored; ``TTS_TEST_CACHE`` overrides the
root). The hash covers the generator's source and the manifests (and, for tiny, the T3 / S3Gen
sources that define its shapes), so a change there makes a fresh folder; stale ones are removed.
Safe under concurrent runs: the generator builds in a temporary folder and renames it into place.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_SEED = 0

_GENERATOR_SOURCES = ["export/demo_checkpoint.py", "tts_common/checkpoint.py", "tts_common/conds.py", "export/manifests/*.json"]
_TINY_SOURCES = ["token_service/t3/config.py", "vocoder_service/s3gen/*.py"]


def _source_hash(preset: str) -> str:
    h = hashlib.sha256()
    patterns = _GENERATOR_SOURCES + (_TINY_SOURCES if preset == "tiny" else [])
    for pattern in patterns:
        for p in sorted(ROOT.glob(pattern)):
            h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def demo_dir(preset: str, seed: int = DEMO_SEED) -> Path:
    """The cached demo folder for ``preset`` / ``seed``, generated on first use."""
    from export.demo_checkpoint import write_demo_checkpoint
    from tts_common.checkpoint import DEMO_MARKER

    root = Path(os.environ.get("TTS_TEST_CACHE", ROOT / ".cache" / "test-demo"))
    out = root / f"{preset}-seed{seed}-{_source_hash(preset)}"
    if not (out / DEMO_MARKER).is_file():
        for stale in root.glob(f"{preset}-seed{seed}-*"):  # older sources; kept 30 min for running sessions
            marker = stale / DEMO_MARKER
            if stale != out and marker.is_file() and time.time() - marker.stat().st_mtime > 1800:
                shutil.rmtree(stale, ignore_errors=True)
        try:
            write_demo_checkpoint(out, preset, seed)
        except FileExistsError:  # another process finished it between our check and our write
            if not (out / DEMO_MARKER).is_file():
                raise
    return out


@pytest.fixture(scope="session")
def demo_turbo_dir() -> Path:
    """Full-size Turbo demo folder (~3 GB on disk, ~15 s to generate once)."""
    return demo_dir("turbo")


@pytest.fixture(scope="session")
def demo_nano_dir() -> Path:
    """Full-size Nano demo folder (T3 = GPT-2 small)."""
    return demo_dir("nano")


@pytest.fixture(scope="session")
def demo_tiny_dir() -> Path:
    """Tiny demo folder (same architecture, small widths; upstream cannot load it)."""
    return demo_dir("tiny")
