"""Engine statistics read back from a service's JSON log (``TTS_STATS_LOG_S``), cut per load level.

    lines = read_stats(log_dir / "vocoder-service.log")      # the engine_stats payloads, in order
    fig = level_stats(lines, t_start, t_end)                 # one level's figures (unix seconds)

A service started with ``TTS_STATS_LOG_S=<s>`` (and ``TTS_LOG_FORMAT=json``) logs its ``stats()``
every ``s`` seconds while busy and once at shutdown (``tts_common.stats_log``). Counters in those
lines are cumulative, so a level's figures are differences between two lines: the last line logged
at or before the level's start (the service's state then; nothing changes while it is idle, which is
when no line is logged) and the last line logged before ``t_end + slack`` (slack: one interval, so
the line covering the level's last work counts). That cut is exact when the load pauses longer than
``slack_s`` (itself longer than the interval) after each level (``vocoder_sweep(settle_s=...)``,
``service_load.run_sweep(settle_s=...)``); without the pause, work of the neighbouring levels leaks in.

``level_stats`` returns (all over the level's wall time ``t_end - t_start``):

* ``delta`` — every numeric leaf that grew (flattened ``a.b`` keys; ``n`` / ``sum`` of histograms too);
* ``per_s`` — those deltas per wall second (e.g. ``worker_steps``, ``tokens``, ``steps``);
* ``mean`` — for each histogram (a dict with ``n`` and ``sum``): Δsum / Δn (e.g. ``push_rows`` = mean
  rows per push batch, ``queue_wait_ms`` = mean wait);
* ``busy_frac`` — Δ``busy_s`` / wall (vocoder worker thread); ``decode_frac`` / ``prefill_frac`` from
  the token engine's ``timings`` when present;
* ``window`` — per histogram, the median of the lines' ``p50`` and the largest ``p99`` / ``max``
  among the lines logged during the level (each line's percentiles cover the interval before it);
* ``peak`` — the largest value of each gauge (``GAUGES``: ``active_sessions``, ``active_streams``,
  ``active``, ...) among the lines logged during the level.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from tts_common.stats_log import STATS_KEY, STATS_MSG

GAUGES = ("active_sessions", "active_streams", "active", "running", "waiting",
          "allocated_MB", "reserved_MB", "peak_reserved_MB")  # the last three: ``gpu_mem`` (tts_common.gpu_memory)
# a load's idle pause after each level = the stats interval + this; the cut's slack_s = interval + half of it
# (so the line covering a level's last work is inside the slack, and the next level's first line is not)
SETTLE_MARGIN_S = 0.5


def read_stats(log_path: Path | str) -> list[dict[str, Any]]:
    """The ``engine_stats`` payloads of a JSON-lines log, in order ([] if the file is missing).

    Reads the log line by line (a long run's service log can be large; only the stats lines are kept)."""
    path = Path(log_path)
    if not path.is_file():
        return []
    out = []
    with path.open(errors="replace") as lines:
        for line in lines:
            if STATS_KEY not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("msg") == STATS_MSG and isinstance(rec.get(STATS_KEY), dict):
                out.append(rec[STATS_KEY])
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def level_stats(lines: list[dict[str, Any]], t_start: float, t_end: float, slack_s: float = 1.0) -> dict[str, Any] | None:
    """One level's figures from the stats ``lines`` (see the module docstring); None without lines."""
    if not lines:
        return None
    before = [x for x in lines if x.get("unix_s", 0) <= t_start]
    during = [x for x in lines if t_start < x.get("unix_s", 0) <= t_end + slack_s]
    if not during:
        return {"lines": 0, "wall_s": round(t_end - t_start, 3)}
    base = _flat(before[-1]) if before else {}
    last = _flat(during[-1])
    wall = max(t_end - t_start, 1e-9)
    skip = set(GAUGES) | {"t", "unix_s"}
    delta = {k: round(v - base.get(k, 0.0), 4) for k, v in last.items()
             if k.split(".")[-1] not in ("p50", "p99", "max", "window_n") and k.split(".")[-1] not in skip
             and v - base.get(k, 0.0) > 0}
    out: dict[str, Any] = {"lines": len(during), "wall_s": round(wall, 3), "delta": delta,
                           "per_s": {k: round(v / wall, 3) for k, v in delta.items() if "." not in k}}
    hists = sorted({k.rsplit(".", 1)[0] for k in last if k.endswith(".n")})
    out["mean"] = {h: round(delta.get(f"{h}.sum", 0.0) / delta[f"{h}.n"], 3) for h in hists if delta.get(f"{h}.n")}
    if "busy_s" in delta or "busy_s" in last:
        out["busy_frac"] = round(delta.get("busy_s", 0.0) / wall, 3)
    for phase in ("decode", "prefill"):
        if f"timings.{phase}_s" in last:
            out[f"{phase}_frac"] = round(delta.get(f"timings.{phase}_s", 0.0) / wall, 3)
    flats = [_flat(x) for x in during]
    window: dict[str, dict[str, float]] = {}
    for h in hists:
        p50 = [fl[f"{h}.p50"] for fl in flats if f"{h}.p50" in fl]  # a line whose window was empty has none
        if p50:
            window[h] = {"p50_median": statistics.median(p50),
                         "p99_max": max(fl[f"{h}.p99"] for fl in flats if f"{h}.p99" in fl),
                         "max": max(fl[f"{h}.max"] for fl in flats if f"{h}.max" in fl)}
    out["window"] = window
    # gauges by leaf name (``gpu_mem.reserved_MB`` -> ``reserved_MB``)
    peak: dict[str, float] = {}
    for f in flats:
        for k, v in f.items():
            leaf = k.rsplit(".", 1)[-1]
            if leaf in GAUGES:
                peak[leaf] = max(peak.get(leaf, 0.0), v)
    out["peak"] = {g: peak[g] for g in GAUGES if g in peak}
    return out


def attach(levels: dict[Any, dict[str, Any]], logs: dict[str, Path], slack_s: float = 1.0) -> None:
    """Add ``engine_stats: {service: level_stats}`` to each level figure that has ``t_start`` / ``t_end``."""
    lines = {name: read_stats(path) for name, path in logs.items()}
    for fig in levels.values():
        if "t_start" not in fig or "t_end" not in fig:
            continue
        fig["engine_stats"] = {name: level_stats(ls, fig["t_start"], fig["t_end"], slack_s)
                               for name, ls in lines.items()}
