"""Fixtures: service pairs (vocoder + token service) on loopback, with fake or real engines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakes import FakeSampling, FakeTokenEngine, fake_vocoder_engine  # noqa: E402
from harness import RunningService  # noqa: E402


class Pair:
    """A vocoder service and a token service that talks to it."""

    def __init__(self, vocoder: RunningService | None, token: RunningService):
        self.vocoder = vocoder
        self.token = token

    def assert_idle(self) -> None:
        """No open stream, KV slot or vocoder session in either service (also via the leak gauges)."""
        t = self.token.wait_idle()
        assert t["active_streams"] == 0 and t["active"] == 0, t
        assert self.token.tel.gauge("tts.t3.kv_slots.active") == 0
        assert self.token.tel.gauge("tts.streams.active") == 0
        if self.vocoder is not None:
            v = self.vocoder.wait_idle()
            assert v["active_streams"] == 0 and v["active_sessions"] == 0, v
            assert self.vocoder.tel.gauge("tts.vocoder.sessions.active") == 0
            assert self.vocoder.tel.gauge("tts.vocoder.streams.active") == 0


@pytest.fixture
def make_pair():
    """``make_pair(token_engine=None, vocoder_engine=None, token_cfg={}, vocoder_cfg={}, vocoder_target=None)``:
    start a pair with fake engines unless given; stopped at teardown."""
    started: list[RunningService] = []

    def make(token_engine=None, vocoder_engine=None, token_cfg=None, vocoder_cfg=None,
             vocoder_target=None, make_sampling=FakeSampling) -> Pair:
        vocoder = None
        if vocoder_target is None:
            vocoder = RunningService("vocoder", vocoder_engine or fake_vocoder_engine(), vocoder_cfg or {})
            started.append(vocoder)
            vocoder_target = vocoder.target
        token = RunningService("token", token_engine or FakeTokenEngine(),
                               {"vocoder_target": vocoder_target, **(token_cfg or {})}, make_sampling=make_sampling)
        started.append(token)
        return Pair(vocoder, token)

    yield make
    for service in reversed(started):
        try:
            service.stop()
        except Exception:
            pass
