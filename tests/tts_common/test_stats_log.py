"""tts_common.stats_log: engine statistics logged while busy, never while idle, once more at shutdown;
and both servers wire it to ``TTS_STATS_LOG_S``."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import pytest

from tts_common.logs import JsonFormatter
from tts_common.stats_log import STATS_KEY, STATS_MSG, StatsLogger


def _lines(caplog, name):
    return [r.__dict__[STATS_KEY] for r in caplog.records if r.name == name and r.getMessage() == STATS_MSG]


def test_logs_only_when_work_changed(caplog):
    caplog.set_level(logging.INFO)
    state = {"active_streams": 0, "steps": 0, "t": 1.0, "step_ms": {"n": 0, "sum": 0.0, "p50": 1.0}}
    log = logging.getLogger("test.stats")
    sl = StatsLogger(lambda: dict(state), 1.0, log)
    assert sl.tick() is True  # the first look always logs
    state["t"] = 2.0
    state["step_ms"] = {"n": 0, "sum": 0.0, "p50": 9.0}  # clocks and window percentiles are not work
    assert sl.tick() is False
    state["steps"] = 3
    assert sl.tick() is True
    assert sl.tick() is False
    busy = StatsLogger(lambda: dict(state), 1.0, log, is_busy=lambda s: s["active_streams"] > 0)
    busy.tick()
    state["active_streams"] = 1  # a stream is open but nothing moved (e.g. stuck): still logged
    assert busy.tick() is True
    lines = _lines(caplog, "test.stats")
    assert [x["steps"] for x in lines] == [0, 3, 3, 3]
    assert all("unix_s" in x and "final" not in x for x in lines)
    with pytest.raises(ValueError):
        StatsLogger(dict, 0, log)


def test_task_logs_while_busy_and_once_at_stop(caplog):
    caplog.set_level(logging.INFO)
    steps = [0]

    async def main():
        sl = StatsLogger(lambda: {"steps": steps[0]}, 0.02, logging.getLogger("test.task"))
        sl.start()
        for _ in range(5):
            steps[0] += 1
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.1)  # idle: nothing more
        n_busy = len(_lines(caplog, "test.task"))
        await sl.stop()
        return n_busy

    n_busy = asyncio.run(main())
    lines = _lines(caplog, "test.task")
    assert 2 <= n_busy <= 6
    assert len(lines) == n_busy + 1 and lines[-1]["final"] is True and lines[-1]["steps"] == 5
    # the JSON formatter writes the payload as a nested object on one line
    record = next(r for r in caplog.records if r.name == "test.task")
    out = json.loads(JsonFormatter("svc").format(record))
    assert out["msg"] == STATS_MSG and out[STATS_KEY]["steps"] >= 1


def test_failing_stats_never_raise(caplog):
    """A ``stats()`` that raises is a warning, in the periodic task and in ``stop()`` (a shutdown callback)."""
    caplog.set_level(logging.INFO)

    def broken():
        raise RuntimeError("no stats")

    async def main():
        sl = StatsLogger(broken, 0.01, logging.getLogger("test.broken"))
        sl.start()
        await asyncio.sleep(0.05)
        await sl.stop()

    asyncio.run(main())
    warnings = [r for r in caplog.records if r.name == "test.broken" and r.levelno == logging.WARNING]
    assert len(warnings) >= 2 and all(r.exc_info and "no stats" in str(r.exc_info[1]) for r in warnings)
    assert not _lines(caplog, "test.broken")

@pytest.mark.integration
def test_vocoder_server_logs_engine_stats(caplog):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from fakes import fake_vocoder_engine
    from harness import RunningService

    caplog.set_level(logging.INFO)
    service = RunningService("vocoder", fake_vocoder_engine(), {"stats_log_s": 0.05})
    try:
        assert service.servicer.engine.stats_window_s == 0.05
        _vocode(service.target, [1, 2, 3, 4, 5])
        time.sleep(0.2)
    finally:
        service.stop()
    lines = _lines(caplog, "vocoder_service.stats")
    assert lines and lines[-1].get("final") is True
    last = lines[-1]
    assert last["tokens"] == 5 and last["worker_steps"] >= 1 and last["active_streams"] == 0
    assert last["push_rows"]["sum"] >= 1 and "queue_wait_ms" in last


@pytest.mark.integration
def test_token_server_logs_engine_stats(caplog):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from fakes import FakeSampling, FakeTokenEngine
    from harness import RunningService

    caplog.set_level(logging.INFO)
    service = RunningService("token", FakeTokenEngine(), {"vocoder_target": "127.0.0.1:1", "stats_log_s": 0.05},
                             make_sampling=FakeSampling)
    service.stop()
    lines = _lines(caplog, "token_service.stats")
    assert len(lines) == 1 and lines[0]["final"] is True and lines[0]["active_streams"] == 0
    assert "free_slots" in lines[0]  # the engine's stats() merged in


def _vocode(target: str, tokens: list[int]) -> None:
    import grpc

    from tts_api.v1 import common_pb2, vocoder_service_pb2 as voc, vocoder_service_pb2_grpc

    def requests():
        yield voc.VocodeRequest(config=voc.VocodeConfig())
        yield voc.VocodeRequest(tokens=voc.TokenChunk(token_ids=tokens))
        yield voc.VocodeRequest(end=common_pb2.EndOfInput())

    with grpc.insecure_channel(target) as ch:
        responses = list(vocoder_service_pb2_grpc.VocoderServiceStub(ch).Vocode(requests(), timeout=10))
    assert responses[-1].final
