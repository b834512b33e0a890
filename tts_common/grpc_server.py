"""What both gRPC servers share: admission control, the aio server with health and reflection, drain.

    server = ServiceServer("vocoder", cfg.listen, cfg.max_message_bytes, ["chatterbox.tts.v1.VocoderService"])
    add_VocoderServiceServicer_to_server(servicer, server.grpc)
    port = await server.start()
    await server.serve_until_signal(cfg.drain_seconds)    # SIGTERM / SIGINT: drain, then stop

Admission: ``maximum_concurrent_rpcs`` would count a bidi stream for its whole life *and* make the
excess wait or fail without a message, so each servicer holds an ``Admission`` counter instead:
beyond ``limit`` open streams a new one is refused at once with RESOURCE_EXHAUSTED and a message
that says so (policy: refuse, no queue; clients retry with backoff).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)


class Admission:
    """A counter of open streams with a hard limit; ``admit()`` is a context manager (see module doc)."""

    def __init__(self, limit: int, what: str):
        self.limit = limit
        self.what = what  # e.g. "token service streams (TTS_MAX_STREAMS)"
        self.active = 0
        self.draining = False
        self.refused = 0

    def try_enter(self) -> str | None:
        """Take a slot; returns None, or the reason the stream is refused."""
        if self.draining:
            self.refused += 1
            return "server is shutting down (draining); retry on another replica"
        if self.active >= self.limit:
            self.refused += 1
            return f"at capacity: {self.active} of {self.limit} {self.what} in use; retry later"
        self.active += 1
        return None

    def leave(self) -> None:
        self.active -= 1


class ServiceServer:
    """A grpc.aio server with health checking, reflection, message limits and graceful drain."""

    def __init__(self, name: str, listen: str, max_message_bytes: int, service_names: Sequence[str]):
        self.name = name
        self.listen = listen
        self.service_names = list(service_names)
        self.grpc = grpc.aio.server(
            options=[
                # the limit guards against hostile input; what we send is bounded by construction
                # (at most 1 s of audio a message), so sends keep gRPC's default (no limit)
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                # accept the token service's 10 s link pings (the default minimum is 5 minutes,
                # after which a server answers "too many pings" and closes the connection)
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                # recycle connections so clients behind client-side load balancing (token pods
                # -> headless vocoder Service) discover new pods; in-flight streams get 10 min
                ("grpc.max_connection_age_ms", 300_000),
                ("grpc.max_connection_age_grace_ms", 600_000),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            self.service_names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.grpc,
        )
        self.admissions: list[Admission] = []
        self.port: int | None = None
        self.on_stop: list = []  # async callables run after the server stopped (e.g. closing channels)
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Bind and start; returns the bound port (useful with ``:0``). Raises if the address is taken."""
        port = self.grpc.add_insecure_port(self.listen)
        if port == 0:
            raise RuntimeError(f"{self.name}: cannot listen on {self.listen}")
        await self.grpc.start()
        self.port = port
        for service in [""] + self.service_names:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"service_name": self.name, "listen": self.listen, "port": port})
        return port

    async def drain(self, seconds: float) -> None:
        """Stop accepting (health NOT_SERVING, new streams UNAVAILABLE), let in-flight streams finish for
        up to ``seconds``, then cancel what is left and stop."""
        if self._stopped.is_set():
            return
        log.info("draining", extra={"service_name": self.name, "drain_seconds": seconds,
                                    "active": sum(a.active for a in self.admissions)})
        for admission in self.admissions:
            admission.draining = True
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace=seconds)
        for callback in self.on_stop:
            await callback()
        self._stopped.set()
        log.info("stopped", extra={"service_name": self.name})

    async def serve_until_signal(self, drain_seconds: float) -> None:
        """Serve until SIGTERM/SIGINT (then drain) or until stopped otherwise."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain(drain_seconds)))
            except (NotImplementedError, RuntimeError):  # not the main thread / platform without signals
                pass
        await self._stopped.wait()


async def serve_until_signal(name: str, cfg, engine, load_engine, start_server, telemetry=None) -> None:
    """Load the engine (unless given), start the server, serve until SIGTERM/SIGINT, then drain.

    ``load_engine(cfg)`` builds the engine; ``start_server(cfg, engine, telemetry)`` returns
    ``(ServiceServer, servicer)``; telemetry comes from the standard ``OTEL_*`` variables unless given.
    """
    from tts_common.telemetry import Telemetry

    if engine is None:
        engine = load_engine(cfg)
    telemetry = telemetry or Telemetry.from_env(name)
    server, _ = await start_server(cfg, engine, telemetry)
    try:
        await server.serve_until_signal(cfg.drain_seconds)
    finally:
        telemetry.shutdown()


def service_main(prog: str, name: str, config_cls, serve, argv: Sequence[str] | None) -> int:
    """A service's console entry point: config from flags and ``TTS_*`` env, logging, ``serve(cfg)``.

    Exit codes: 0 after a clean drain, 2 for bad configuration, 1 when start-up fails (bad model
    folder, port taken, ...), each with a one-line reason on stderr.
    """
    import sys

    from tts_common.config import ConfigError, load_config
    from tts_common.logs import setup_logging

    try:
        cfg = load_config(config_cls, sys.argv[1:] if argv is None else argv, prog=prog)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    setup_logging(name, cfg.log_level, cfg.log_format)
    try:
        asyncio.run(serve(cfg))
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        log.error("startup failed: %s", exc, exc_info=cfg.log_level == "DEBUG")
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
