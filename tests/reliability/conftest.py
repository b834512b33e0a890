"""Reliability fixtures: the real tiny engines behind real servers on loopback, plus process helpers.

Servers run in-process on their own loop threads (tests/integration/harness.py), so their stats
(open streams, KV slots, vocoder sessions) and leak gauges can be asserted; scenarios that need a
real process (SIGKILL, SIGTERM) start ``python -m ... serve`` subprocesses (bench/service_load.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clients import MAX_NEW  # noqa: E402
from service_pair import real_engines, service_pairs  # noqa: E402


@pytest.fixture(scope="session")
def tiny_engines(demo_tiny_dir):
    """(token engine, vocoder engine) on CPU from the tiny demo checkpoint, shared by the suite."""
    yield from real_engines(demo_tiny_dir, kv_slots=8)


@pytest.fixture
def real_pair(tiny_engines):
    """``real_pair(token_cfg={}, vocoder_cfg={}, vocoder_target=None)``: servers around the tiny engines
    (``max_new_tokens=MAX_NEW`` unless ``token_cfg`` says otherwise); stopped at teardown."""
    token_engine, vocoder_engine = tiny_engines
    yield from service_pairs(lambda: token_engine, lambda: vocoder_engine,
                             token_defaults={"max_new_tokens": MAX_NEW}, idle_timeout=10.0)
