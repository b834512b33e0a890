"""Co-located mode: the token service and the vocoder service in ONE process (one CUDA context).

    python -m token_service serve-colocated --model-dir DIR --listen 0.0.0.0:50051 \\
        --vocoder-flags "--dtype float16 --cuda-graphs true --max-streams 64"

For small single-GPU deployments: every CUDA process pays its own context (~610 MB on an H100) plus
cuBLAS / cuDNN / Triton workspaces outside torch's allocator, so one process instead of two saves
~0.75 GB of GPU memory. Both servers run in the same asyncio loop; the token service still calls the
vocoder over gRPC (same code path, same traces and metrics), on a loopback port chosen at start-up
(or the vocoder's ``--listen``, e.g. ``unix:/tmp/vocoder.sock``). The two-process layout stays the
default (docs/ARCHITECTURE.md, "Co-located mode").

Settings (``ColocatedConfig``):

* the token service's: its usual flags and ``TTS_*`` variables, except ``--vocoder-target`` /
  ``TTS_VOCODER_TARGET``, which is an error here (the target is the in-process vocoder);
* the vocoder's: only ``--vocoder-flags`` / ``TTS_VOCODER_FLAGS``, one string of
  ``tts-vocoder-service`` flags (``"--dtype float16 --max-streams 64"``). The vocoder reads no other
  ``TTS_*`` variable (they are the token service's). Unless given there, it takes the token
  service's ``model_dir``, ``voices_dir``, ``drain_seconds``, ``stats_log_s`` and
  ``max_message_bytes``, and listens on ``127.0.0.1:0``. ``--device``, ``--log-level``,
  ``--log-format`` and ``--cuda-stack-bytes`` are process-wide (one device, one log, one CUDA
  context): the token service's apply to both, and giving them there is an error.

Shutdown: SIGTERM / SIGINT drains the token service first (its in-flight streams still need the
vocoder), then the vocoder service. If either server fails to start, what was started is stopped and
the process exits 1 with the reason; bad settings exit 2 (``tts_common.grpc_server.service_main``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from token_service.config import TokenServiceConfig
from tts_common.config import ConfigError, config_fields, load_config, setting
from tts_common.cuda_capture import share_cuda_context
from tts_common.grpc_server import ServiceServer, service_main
from tts_common.telemetry import Telemetry

if TYPE_CHECKING:
    from vocoder_service.config import VocoderServiceConfig

log = logging.getLogger("token_service.colocated")

PROG = "tts-colocated"
VOCODER_LISTEN = "127.0.0.1:0"  # loopback, a free port: the token service's vocoder target
INHERITED = ("model_dir", "voices_dir", "drain_seconds", "stats_log_s", "max_message_bytes")
PROCESS_WIDE = {"device": "--device / TTS_DEVICE (both engines share one device and one CUDA context)",
                "log_level": "--log-level / TTS_LOG_LEVEL (one log per process)",
                "log_format": "--log-format / TTS_LOG_FORMAT (one log per process)",
                "cuda_stack_bytes": "--cuda-stack-bytes / TTS_CUDA_STACK_BYTES (a CUDA limit of the whole process)"}


@dataclass
class ColocatedConfig(TokenServiceConfig):
    """Token service + in-process vocoder service (one process, one device); see the module doc."""

    vocoder_target: str = setting("", "not settable here: the token service calls the in-process vocoder")
    vocoder_flags: str = setting("", "the vocoder service's settings as tts-vocoder-service flags in one string, "
                                     "e.g. \"--dtype float16 --cuda-graphs true\"; the vocoder reads no other TTS_* "
                                     "variable and takes model-dir, voices-dir, drain-seconds, stats-log-s, "
                                     "max-message-bytes from the token service unless given here")

    def validate(self) -> None:
        super().validate()
        if self.vocoder_target:
            raise ConfigError(f"--vocoder-target / TTS_VOCODER_TARGET is {self.vocoder_target!r}, but in co-located "
                              "mode the token service calls the in-process vocoder; unset it (vocoder settings go in "
                              "--vocoder-flags / TTS_VOCODER_FLAGS)")
        vocoder_config(self)  # bad vocoder flags fail here, before any model loads


def vocoder_config(cfg: ColocatedConfig) -> VocoderServiceConfig:
    """The in-process vocoder's config: ``cfg.vocoder_flags``, then what it takes from ``cfg``
    (``INHERITED``; ``PROCESS_WIDE`` always), then the vocoder's defaults; no environment."""
    from vocoder_service.config import VocoderServiceConfig

    try:
        argv = shlex.split(cfg.vocoder_flags)
    except ValueError as exc:
        raise ConfigError(f"--vocoder-flags / TTS_VOCODER_FLAGS: cannot split {cfg.vocoder_flags!r}: {exc}") from None
    known = {spec.flag: spec.name for spec in config_fields(VocoderServiceConfig)}
    given: set[str] = set()
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            if i == 0 or not argv[i - 1].startswith("--") or "=" in argv[i - 1]:
                raise ConfigError(f"--vocoder-flags / TTS_VOCODER_FLAGS: {arg!r} is not a flag "
                                  "(expected \"--name value ...\")")
            continue
        flag = arg.split("=", 1)[0]
        if flag not in known:
            raise ConfigError(f"--vocoder-flags / TTS_VOCODER_FLAGS: unknown vocoder flag {flag}; "
                              f"see `python -m vocoder_service serve --help`")
        name = known[flag]
        if name in PROCESS_WIDE:
            raise ConfigError(f"--vocoder-flags / TTS_VOCODER_FLAGS: {flag} cannot be set for the vocoder alone in "
                              f"co-located mode; set the token service's {PROCESS_WIDE[name]}")
        if "=" not in arg and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            raise ConfigError(f"--vocoder-flags / TTS_VOCODER_FLAGS: {flag} needs a value")
        given.add(name)
    argv = [a for arg in argv for a in (arg.split("=", 1) if arg.startswith("--") and "=" in arg else [arg])]
    overrides = {name: getattr(cfg, name) for name in (*INHERITED, *PROCESS_WIDE)
                 if name not in given and name in known.values() and hasattr(cfg, name)}
    if "listen" not in given:
        overrides["listen"] = VOCODER_LISTEN
    try:
        return load_config(VocoderServiceConfig, argv, {}, prog=f"{PROG} --vocoder-flags", **overrides)
    except ConfigError as exc:
        raise ConfigError(f"vocoder (--vocoder-flags / TTS_VOCODER_FLAGS): {exc}") from None


def loopback_target(listen: str, port: int) -> str:
    """The address the token service dials for a vocoder bound on ``listen`` (port ``port``)."""
    if listen.startswith("unix:") or listen.startswith("unix-abstract:"):
        return listen
    host = listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]", "*"):
        host = "127.0.0.1"
    return f"{host}:{port}"


@dataclass
class ColocatedServers:
    """Both started servers; ``drain`` stops the token service first, then the vocoder service."""

    token: ServiceServer
    vocoder: ServiceServer
    token_servicer: object
    vocoder_servicer: object
    vocoder_target: str

    async def drain(self, token_seconds: float, vocoder_seconds: float) -> None:
        try:
            await self.token.drain(token_seconds)
        finally:
            await self.vocoder.drain(vocoder_seconds)


async def start_colocated(cfg: ColocatedConfig, vcfg, token_engine, vocoder_engine, token_telemetry: Telemetry,
                          vocoder_telemetry: Telemetry, make_sampling=None) -> ColocatedServers:
    """Start the vocoder server, then the token server pointed at it (same loop). If the token server
    fails to start, the vocoder server is stopped before the error propagates."""
    from token_service.server import start_server as start_token_server
    from vocoder_service.server import start_server as start_vocoder_server

    try:
        vserver, vservicer = await start_vocoder_server(vcfg, vocoder_engine, vocoder_telemetry)
    except (OSError, RuntimeError) as exc:
        raise RuntimeError(f"vocoder service failed to start (--vocoder-flags --listen {vcfg.listen}): {exc}") from exc
    try:
        target = loopback_target(vcfg.listen, vserver.port)
        tcfg = dataclasses.replace(cfg, vocoder_target=target)
        tserver, tservicer = await start_token_server(tcfg, token_engine, token_telemetry, make_sampling=make_sampling)
    except (OSError, RuntimeError) as exc:
        await vserver.drain(0)
        raise RuntimeError(f"token service failed to start (--listen {cfg.listen}): {exc}") from exc
    except BaseException:
        await vserver.drain(0)
        raise
    log.info("co-located", extra={"vocoder_target": target, "token_port": tserver.port})
    return ColocatedServers(tserver, vserver, tservicer, vservicer, target)


async def serve(cfg: ColocatedConfig) -> None:
    """Load both engines on ``cfg.device``, start both servers, serve until SIGTERM/SIGINT, drain both."""
    from token_service.engine_loader import load_engine as load_token_engine
    from vocoder_service.engine.loader import load_engine as load_vocoder_engine

    vcfg = vocoder_config(cfg)
    share_cuda_context()  # both engines' threads capture CUDA graphs in one context (tts_common/cuda_capture.py)
    vocoder_engine = token_engine = None
    vtel, ttel = Telemetry.from_env("vocoder-service"), Telemetry.from_env("token-service")
    try:
        vocoder_engine = load_vocoder_engine(vcfg)
        token_engine = load_token_engine(cfg)
        servers = await start_colocated(cfg, vcfg, token_engine, vocoder_engine, ttel, vtel)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        await stop.wait()
        await servers.drain(cfg.drain_seconds, vcfg.drain_seconds)
    finally:
        for engine, method in ((token_engine, "close"), (vocoder_engine, "shutdown")):
            if engine is not None and hasattr(engine, method):
                getattr(engine, method)()  # stop their threads (the process may be a test's)
        ttel.shutdown()
        vtel.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m token_service serve-colocated`` (flags and TTS_* env; see --help)."""
    return service_main(PROG, PROG, ColocatedConfig, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
