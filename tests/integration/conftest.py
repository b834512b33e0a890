"""Fixtures: service pairs (vocoder + token service) on loopback, with fake or real engines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakes import FakeSampling, FakeTokenEngine, fake_vocoder_engine  # noqa: E402
from service_pair import service_pairs  # noqa: E402


@pytest.fixture
def make_pair():
    """``make_pair(token_engine=None, vocoder_engine=None, token_cfg={}, vocoder_cfg={}, vocoder_target=None,
    make_sampling=FakeSampling)``: start a pair with fresh fake engines unless given; stopped at teardown."""
    yield from service_pairs(FakeTokenEngine, fake_vocoder_engine, make_sampling=FakeSampling)
