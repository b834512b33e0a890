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
from harness import RunningService  # noqa: E402


@pytest.fixture(scope="session")
def tiny_engines(demo_tiny_dir):
    """(token engine, vocoder engine) on CPU from the tiny demo checkpoint, shared by the suite."""
    from token_service.config import TokenServiceConfig
    from token_service.engine_loader import load_engine as load_token_engine
    from tts_common.config import load_config
    from vocoder_service.config import VocoderServiceConfig
    from vocoder_service.engine.loader import load_engine as load_vocoder_engine

    tcfg = load_config(TokenServiceConfig, [], {}, model_dir=str(demo_tiny_dir), device="cpu", kv_slots=8,
                       max_new_tokens=300, max_seq_len=1024)
    vcfg = load_config(VocoderServiceConfig, [], {}, model_dir=str(demo_tiny_dir), device="cpu")
    token_engine = load_token_engine(tcfg)
    vocoder_engine = load_vocoder_engine(vcfg)
    yield token_engine, vocoder_engine
    token_engine.close()
    vocoder_engine.shutdown()


class Pair:
    """A vocoder service and a token service talking to it (either may be None / replaced)."""

    def __init__(self, vocoder: RunningService | None, token: RunningService):
        self.vocoder = vocoder
        self.token = token

    def assert_idle(self, timeout: float = 10.0) -> None:
        """No open stream, KV slot or vocoder session left (stats and the leak gauges)."""
        t = self.token.wait_idle(timeout)
        assert t["active_streams"] == 0 and t["active"] == 0, t
        assert self.token.tel.gauge("tts.t3.kv_slots.active") == 0
        assert self.token.tel.gauge("tts.streams.active") == 0
        if self.vocoder is not None:
            v = self.vocoder.wait_idle(timeout)
            assert v["active_streams"] == 0 and v["active_sessions"] == 0, v
            assert self.vocoder.tel.gauge("tts.vocoder.sessions.active") == 0
            assert self.vocoder.tel.gauge("tts.vocoder.streams.active") == 0


@pytest.fixture
def real_pair(tiny_engines):
    """``real_pair(token_cfg={}, vocoder_cfg={}, vocoder_target=None)``: servers around the tiny engines."""
    started: list[RunningService] = []
    token_engine, vocoder_engine = tiny_engines

    def make(token_cfg=None, vocoder_cfg=None, vocoder_target=None) -> Pair:
        vocoder = None
        if vocoder_target is None:
            vocoder = RunningService("vocoder", vocoder_engine, vocoder_cfg or {})
            started.append(vocoder)
            vocoder_target = vocoder.target
        token = RunningService("token", token_engine,
                               {"vocoder_target": vocoder_target, "max_new_tokens": MAX_NEW, **(token_cfg or {})})
        started.append(token)
        return Pair(vocoder, token)

    yield make
    for service in reversed(started):
        try:
            service.stop()
        except Exception:
            pass
