"""A token service + vocoder service pair on loopback, and the factory both suites' fixtures wrap.

``tests/integration/conftest.py`` (fake engines, a fresh pair of engines per call) and
``tests/reliability/conftest.py`` (the real tiny engines, shared) differ only in their defaults:
which engines, which token-service settings and sampling factory, how long ``assert_idle`` waits. :func:`real_engines` loads the real engines (tiny demo folder) for
both suites.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from harness import RunningService

_UNSET: Any = object()


class Pair:
    """A vocoder service and a token service that talks to it (``vocoder`` is None when the token
    service was pointed at an outside target)."""

    def __init__(self, vocoder: RunningService | None, token: RunningService, idle_timeout: float = 5.0):
        self.vocoder = vocoder
        self.token = token
        self.idle_timeout = idle_timeout

    def assert_idle(self, timeout: float | None = None) -> None:
        """No open stream, KV slot or vocoder session in either service (also via the leak gauges)."""
        timeout = self.idle_timeout if timeout is None else timeout
        t = self.token.wait_idle(timeout)
        assert t["active_streams"] == 0 and t["active"] == 0, t
        assert self.token.tel.gauge("tts.t3.kv_slots.active") == 0
        assert self.token.tel.gauge("tts.streams.active") == 0
        if self.vocoder is not None:
            v = self.vocoder.wait_idle(timeout)
            assert v["active_streams"] == 0 and v["active_sessions"] == 0, v
            assert self.vocoder.tel.gauge("tts.vocoder.sessions.active") == 0
            assert self.vocoder.tel.gauge("tts.vocoder.streams.active") == 0


MakePair = Callable[..., Pair]


def service_pairs(default_token_engine: Callable[[], Any], default_vocoder_engine: Callable[[], Any],
                  token_defaults: dict | None = None, make_sampling: Any = None,
                  idle_timeout: float = 5.0) -> Iterator[MakePair]:
    """Generator for a pytest fixture: yields ``make(token_engine=None, vocoder_engine=None,
    token_cfg=None, vocoder_cfg=None, vocoder_target=None, make_sampling=<default>) -> Pair``
    and, once the test is done, stops every service it started (newest first).

    ``default_*_engine`` are called for each pair that is not given an engine; ``token_defaults``
    go under each pair's ``token_cfg`` (``vocoder_target`` is always set). With ``vocoder_target``
    no vocoder service is started and the token service dials that address instead.
    """
    started: list[RunningService] = []
    default_sampling = make_sampling

    def make(token_engine=None, vocoder_engine=None, token_cfg: dict | None = None,
             vocoder_cfg: dict | None = None, vocoder_target: str | None = None,
             make_sampling: Any = _UNSET) -> Pair:
        sampling = default_sampling if make_sampling is _UNSET else make_sampling
        vocoder = None
        if vocoder_target is None:
            vocoder = RunningService("vocoder", vocoder_engine or default_vocoder_engine(), vocoder_cfg or {})
            started.append(vocoder)
            vocoder_target = vocoder.target
        token = RunningService("token", token_engine or default_token_engine(),
                               {"vocoder_target": vocoder_target, **(token_defaults or {}), **(token_cfg or {})},
                               make_sampling=sampling)
        started.append(token)
        return Pair(vocoder, token, idle_timeout)

    yield make
    for service in reversed(started):
        try:
            service.stop()
        except Exception:
            pass


def real_engines(model_dir, kv_slots: int, max_new_tokens: int = 300, max_seq_len: int = 1024) -> Iterator[tuple]:
    """Generator for a pytest fixture: yields ``(token engine, vocoder engine)`` loaded on CPU from
    ``model_dir`` (e.g. the tiny demo folder), and closes both afterwards."""
    from token_service.config import TokenServiceConfig
    from token_service.engine_loader import load_engine as load_token_engine
    from tts_common.config import load_config
    from vocoder_service.config import VocoderServiceConfig
    from vocoder_service.engine.loader import load_engine as load_vocoder_engine

    tcfg = load_config(TokenServiceConfig, [], {}, model_dir=str(model_dir), device="cpu", kv_slots=kv_slots,
                       max_new_tokens=max_new_tokens, max_seq_len=max_seq_len)
    vcfg = load_config(VocoderServiceConfig, [], {}, model_dir=str(model_dir), device="cpu")
    token_engine = load_token_engine(tcfg)
    vocoder_engine = load_vocoder_engine(vcfg)
    try:
        yield token_engine, vocoder_engine
    finally:
        token_engine.close()
        vocoder_engine.shutdown()
