"""The vocoder service opens a stream's backend session when its config arrives (``session.prepare()``,
issue 6), before the first token chunk; a failed open still ends the stream with INTERNAL and the
error, and a stream that ends before any token releases its backend."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from harness import RunningService

from tts_api.v1 import common_pb2, vocoder_service_pb2, vocoder_service_pb2_grpc
from vocoder_service.engine import VocoderEngine

pytestmark = pytest.mark.integration


class Backends:
    """Fake backends: log when each was opened / pushed / closed (monotonic seconds)."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.log: list[tuple[str, int, float]] = []
        self.lock = threading.Lock()

    def _note(self, what: str, seed: int) -> None:
        with self.lock:
            self.log.append((what, seed, time.monotonic()))

    def open(self, voice, seed):
        self._note("open", seed)
        if self.fail:
            raise RuntimeError("voice tensors could not be placed on the device")
        backends = self

        class Backend:
            def push(self, ids):
                backends._note("push", seed)
                return np.zeros(960 * len(ids), np.float32)

            def finish(self):
                return np.zeros(0, np.float32)

            def close(self):
                backends._note("close", seed)

        return Backend()


def _requests(seed: int, tokens: list[int], wait_s: float, sent: list[float]):
    voc = vocoder_service_pb2
    yield voc.VocodeRequest(config=voc.VocodeConfig(voice="default", seed=seed))
    time.sleep(wait_s)  # the token service is still generating the first tokens
    if tokens:
        sent.append(time.monotonic())
        yield voc.VocodeRequest(tokens=voc.TokenChunk(token_ids=tokens))
    yield voc.VocodeRequest(end=common_pb2.EndOfInput())


@pytest.fixture
def service():
    started = []

    def start(backends: Backends) -> RunningService:
        svc = RunningService("vocoder", VocoderEngine(backends.open, ["default"]), {})
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()
        svc.engine.shutdown()


def _vocode(target: str, seed: int, tokens: list[int], wait_s: float = 0.3):
    sent: list[float] = []
    with grpc.insecure_channel(target) as ch:
        stub = vocoder_service_pb2_grpc.VocoderServiceStub(ch)
        replies = list(stub.Vocode(_requests(seed, tokens, wait_s, sent), timeout=30))
    return replies, sent


def test_backend_opens_when_the_config_arrives(service):
    backends = Backends()
    svc = service(backends)
    replies, sent = _vocode(svc.target, 3, [1, 2, 3, 4, 5])
    assert sum(len(r.pcm_f32) for r in replies) == 4 * 960 * 5 and replies[-1].final
    opens = [t for what, _, t in backends.log if what == "open"]
    assert len(opens) == 1 and opens[0] < sent[0]  # opened before the first chunk was even sent
    st = svc.wait_idle()
    assert st["early_opens"] == 1 and st["open_ms"]["n"] == 1
    assert st["active_sessions"] == 0 and [w for w, _, _ in backends.log][-1] == "close"


def test_stream_without_tokens_releases_the_early_backend(service):
    backends = Backends()
    svc = service(backends)
    replies, _ = _vocode(svc.target, 4, [], wait_s=0.2)
    assert replies and replies[-1].final and not any(r.pcm_f32 for r in replies)
    st = svc.wait_idle()
    assert st["active_sessions"] == 0
    assert [w for w, _, _ in backends.log] == ["open", "close"]


def test_failed_early_open_ends_the_stream_with_internal(service):
    svc = service(Backends(fail=True))
    with pytest.raises(grpc.RpcError) as err:
        _vocode(svc.target, 5, [1, 2, 3])
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "could not be placed on the device" in err.value.details()
    st = svc.wait_idle()
    assert st["active_sessions"] == 0 and st["active_streams"] == 0
