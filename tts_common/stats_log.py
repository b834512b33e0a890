"""Periodic engine-statistics log lines (``TTS_STATS_LOG_S``): what the benches read back per load level.

    stats_log = StatsLogger(servicer.stats, interval_s=2.0, log=logging.getLogger("vocoder_service.stats"))
    stats_log.start()                    # on the server's event loop
    server.on_stop.append(stats_log.stop)  # one last line at shutdown

Every ``interval_s`` seconds, while the service is busy (some value of ``stats()`` that counts work
changed since the last line, or ``is_busy(stats)`` says so), one INFO record ``"engine stats"``
with the whole dict under the ``engine_stats`` key (with ``TTS_LOG_FORMAT=json``: one JSON line,
``{"msg": "engine stats", "engine_stats": {...}, ...}``); ``stop()`` logs one more line
(``"final": true``) whatever the state. The first tick always logs (the state the counters start
from); after that an idle service logs nothing. A failing ``stats()`` is logged as a warning, never
raised (statistics must not take the service down, nor break its shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

STATS_MSG = "engine stats"
STATS_KEY = "engine_stats"

# values that move without work (clocks) and must not make an idle service look busy
_VOLATILE = ("t", "window_n", "p50", "p99", "max")


class StatsLogger:
    """Logs ``stats()`` every ``interval_s`` seconds while busy, and once at ``stop()`` (module docstring)."""

    def __init__(self, stats: Callable[[], dict[str, Any]], interval_s: float, log: logging.Logger,
                 is_busy: Callable[[dict[str, Any]], bool] | None = None):
        if interval_s <= 0:
            raise ValueError(f"stats log interval must be > 0 seconds, got {interval_s}")
        self._stats = stats
        self.interval_s = interval_s
        self._log = log
        self._is_busy = is_busy
        self._last: Any = None
        self._task: asyncio.Task | None = None
        self.lines = 0

    def start(self) -> None:
        """Start the periodic task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stats-log")

    async def stop(self) -> None:
        """Stop the task and log the final line."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            self.emit(final=True)
        except Exception:  # noqa: BLE001 - runs among the server's shutdown callbacks
            self._log.warning("engine stats failed", exc_info=True)

    def tick(self) -> bool:
        """Log a line if busy since the last one; returns whether it did (the task calls this)."""
        stats = self._stats()
        key = _work_values(stats)
        busy = key != self._last or (self._is_busy is not None and self._is_busy(stats))
        if busy:
            self._last = key
            self._write(stats, final=False)
        return busy

    def emit(self, final: bool = False) -> None:
        """Log a line now."""
        stats = self._stats()
        self._last = _work_values(stats)
        self._write(stats, final)

    def _write(self, stats: dict[str, Any], final: bool) -> None:
        self.lines += 1
        payload = {**stats, "unix_s": round(time.time(), 3)}
        if final:
            payload["final"] = True
        self._log.info(STATS_MSG, extra={STATS_KEY: payload})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - statistics must never take the service down
                self._log.warning("engine stats failed", exc_info=True)


def _work_values(stats: Any) -> Any:
    """The values of ``stats`` that only change with work (nested dicts flattened, clocks dropped)."""
    if isinstance(stats, dict):
        return tuple((k, _work_values(v)) for k, v in sorted(stats.items(), key=lambda kv: str(kv[0]))
                     if k not in _VOLATILE)
    return stats
