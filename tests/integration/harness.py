"""Real gRPC servers on loopback for integration tests, each "process" on its own thread and loop.

Each service gets its own event loop thread and its own OpenTelemetry providers (in-memory span
exporter and metric reader), as separate processes would have; the only thing that links their spans
is the trace context in the gRPC metadata.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tts_common.config import load_config
from tts_common.telemetry import Telemetry


class LoopThread:
    """An asyncio event loop running on a daemon thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_rest():  # e.g. an engine's scheduler task bound to this loop
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_rest(), timeout=10)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class MemoryTelemetry:
    """A Telemetry with in-memory exporters, plus helpers to read them."""

    name: str
    spans: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    metrics: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)

    def __post_init__(self):
        tp = TracerProvider()
        tp.add_span_processor(SimpleSpanProcessor(self.spans))
        self.telemetry = Telemetry(self.name, tp, MeterProvider(metric_readers=[self.metrics]))

    def metric(self, name: str):
        """Data points of metric ``name`` (latest collection), or []."""
        data = self.metrics.get_metrics_data()
        for rm in (data.resource_metrics if data else []):
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        return list(m.data.data_points)
        return []

    def gauge(self, name: str) -> float:
        points = self.metric(name)
        assert points, f"no metric {name}"
        return points[0].value


class RunningService:
    """One service started on 127.0.0.1:0 in its own loop thread."""

    def __init__(self, kind: str, engine, cfg_overrides: dict, make_sampling=None):
        self.kind = kind
        self.engine = engine
        self.thread = LoopThread(f"{kind}-service")
        self.tel = MemoryTelemetry(f"{kind}-service")
        if kind == "vocoder":
            from vocoder_service.config import VocoderServiceConfig
            from vocoder_service.server import start_server

            self.cfg = load_config(VocoderServiceConfig, [], {}, **{"listen": "127.0.0.1:0", "model_dir": "unused", **cfg_overrides})
            self.server, self.servicer = self.thread.run(start_server(self.cfg, engine, self.tel.telemetry))
        else:
            from token_service.config import TokenServiceConfig
            from token_service.server import start_server

            self.cfg = load_config(TokenServiceConfig, [], {}, **{"listen": "127.0.0.1:0", "model_dir": "unused", **cfg_overrides})
            self.server, self.servicer = self.thread.run(
                start_server(self.cfg, engine, self.tel.telemetry, make_sampling=make_sampling))
        self.port = self.server.port
        self.target = f"127.0.0.1:{self.port}"

    def stats(self) -> dict:
        return self.thread.run(_call(self.servicer.stats))

    def wait_idle(self, timeout: float = 5.0, settle: float = 0.2) -> dict:
        """Wait until no stream, KV slot or session is open; returns the stats (asserting is the caller's)."""
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        while True:
            s = self.stats()
            idle = s["active_streams"] == 0 and s.get("active", 0) == 0 and s.get("active_sessions", 0) == 0
            now = time.monotonic()
            # idle must hold for `settle` seconds: a call the peer opened just before an error (the
            # token service opens its Vocode call right after the config) may still be arriving
            idle_since = (idle_since or now) if idle else None
            if (idle_since is not None and now - idle_since >= settle) or now > deadline:
                return s
            time.sleep(0.02)

    def stop(self, grace: float = 0.0) -> None:
        if not self.thread.thread.is_alive():
            return
        try:
            self.thread.run(self.server.drain(grace), timeout=grace + 30)
        finally:
            self.thread.stop()


async def _call(fn):
    return fn()


def channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target)
