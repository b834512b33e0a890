"""bench/vocoder_load.py and bench/engine_stats.py: token pacing, the vocoder-side figures, the stats
cut per level; a sweep against an in-process vocoder service (tiny model) and the GPU bench's
``vocoder_only_section`` on CPU (a real process, stats read back from its log)."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from bench.engine_stats import level_stats, read_stats  # noqa: E402
from bench.vocoder_load import (SILENCE, VocodeRecord, VocodeSpec, mode_rate, run_vocode_level,  # noqa: E402
                                summarize_vocode, vocoder_only_section, vocoder_sweep)

SECONDS_PER_TOKEN = 960 / 24_000


def test_messages_and_modes():
    spec = VocodeSpec(sentence_tokens=5, tokens_per_message=2)
    one, two = spec.messages(0), spec.messages(1)  # 0 = alternate 1 and 2 sentences
    assert [len(ids) for ids, _ in one] == [2, 2, 1, 3] and one[-1] == (SILENCE, False)
    assert sum(len(ids) for ids, _ in two) == 2 * (5 + 3)
    assert all(paced for ids, paced in two if ids != SILENCE)
    assert spec.messages(1) == two  # same index, same tokens
    assert all(0 <= t < 6561 for ids, _ in two for t in ids)
    assert (mode_rate("realtime"), mode_rate("burst"), mode_rate("fast"), mode_rate("40")) == (25.0, 100.0, 0.0, 40.0)
    with pytest.raises(ValueError, match="unknown mode"):
        mode_rate("slow")
    with pytest.raises(ValueError):
        mode_rate("-3")


def test_chunk_latency_and_ideal_underruns():
    rec = VocodeRecord(index=0, sent=[0.0, 0.1, 0.2, 0.3], end_sent=0.35)
    # audio for tokens 1..3 arrives 50 ms after the third token; 1 token's worth after the 4th; the rest at the end
    rec.messages = [(0.25, 0.12, 3, False), (0.4, 0.0, 4, False), (0.42, 0.04, 4, False), (0.5, 0.04, 4, True)]
    rec.chunks = [(a, d) for a, d, _, _ in rec.messages if d > 0]
    lat = rec.chunk_latencies()
    assert [round(x, 3) for x in lat] == [0.05, 0.12, 0.15]  # empty messages have no latency
    # an instant vocoder: 0.12 s from 0.2, then 0.04 s at 0.3 (0.32 played out: no gap) and at 0.35
    assert rec.ideal_underruns() == 0
    assert rec.underruns()[0] == 2  # the real arrivals: 0.37 < 0.42, then 0.46 < 0.5


def test_level_stats_cuts_by_time():
    def line(t, steps, busy, rows_n, rows_sum, p99, active=0):
        return {"unix_s": t, "t": t, "worker_steps": steps, "busy_s": busy, "active_sessions": active,
                "push_rows": {"n": rows_n, "sum": rows_sum, "window_n": 1, "p50": 2.0, "p99": p99, "max": p99}}

    lines = [line(90, 5, 0.5, 5, 5, 1), line(101, 15, 2.5, 15, 45, 8, 4), line(105, 25, 4.5, 25, 125, 12, 8),
             line(111, 35, 6.5, 35, 205, 9), line(130, 99, 9.0, 99, 999, 1)]
    fig = level_stats(lines, 100.0, 110.0, slack_s=1.0)
    assert fig["lines"] == 3 and fig["wall_s"] == 10.0
    assert fig["delta"]["worker_steps"] == 30 and fig["per_s"]["worker_steps"] == 3.0
    assert fig["busy_frac"] == 0.6
    assert fig["mean"]["push_rows"] == round(200 / 30, 3)
    assert fig["window"]["push_rows"] == {"p50_median": 2.0, "p99_max": 12, "max": 12}
    assert fig["peak"]["active_sessions"] == 8
    assert "reserved_MB" not in fig["peak"]  # no gpu_mem in these lines
    # nested gauges count by their leaf name, and are peaks, not deltas
    for i, x in enumerate(lines):
        x["gpu_mem"] = {"reserved_MB": [100.0, 300.0, 250.0, 200.0, 900.0][i], "allocated_MB": 50.0}
    fig = level_stats(lines, 100.0, 110.0, slack_s=1.0)
    assert fig["peak"]["reserved_MB"] == 300.0 and fig["peak"]["allocated_MB"] == 50.0
    assert not any(k.startswith("gpu_mem") for k in fig["delta"])
    assert level_stats([], 0, 1) is None
    assert level_stats(lines, 200.0, 210.0)["lines"] == 0


@pytest.fixture(scope="module")
def tiny_vocoder_service(demo_tiny_dir):
    from harness import RunningService

    from tts_common.config import load_config
    from vocoder_service.config import VocoderServiceConfig
    from vocoder_service.engine.loader import load_engine

    engine = load_engine(load_config(VocoderServiceConfig, [], {}, model_dir=str(demo_tiny_dir), device="cpu"))
    service = RunningService("vocoder", engine, {"max_streams": 8})
    yield service
    service.stop()
    engine.shutdown()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_sweep_against_a_tiny_vocoder_service(tiny_vocoder_service):
    target = tiny_vocoder_service.target
    spec = VocodeSpec(rate_tps=0, sentence_tokens=10)
    run = vocoder_sweep(target, [1, 3], spec, rounds=1, log=lambda m: None)
    assert set(run["levels"]) == {1, 3}
    for (n, fig), indices in zip(run["levels"].items(), ([0], [1, 2, 3])):
        assert fig["ok"] == fig["requests"] == n and fig["errors"] == 0, fig
        # every token gives 960 samples: stream i speaks 1 + i % 2 sentences of 10 + 3 silence tokens
        want = sum((1 + i % 2) * 13 for i in indices) * SECONDS_PER_TOKEN
        assert math.isclose(fig["audio_s"], round(want, 3), abs_tol=1e-3)
        assert fig["ttfa_p50_ms"] > 0 and fig["chunk_latency_p50_ms"] >= 0 and fig["audio_s_per_s"] > 0
        assert fig["t_end"] > fig["t_start"]
    tiny_vocoder_service.wait_idle()
    assert tiny_vocoder_service.stats()["active_sessions"] == 0


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_paced_streams_follow_their_rate(tiny_vocoder_service):
    spec = VocodeSpec(rate_tps=50.0, sentences=1, sentence_tokens=10, tokens_per_message=2)
    level = asyncio.run(run_vocode_level(tiny_vocoder_service.target, 2, 2, spec))
    fig = summarize_vocode(level)
    assert fig["ok"] == 2
    for rec in level.records:
        assert len(rec.sent) == 13
        # messages of 2 tokens due at (k + 1) / 50 s after the first: the 5th (tokens 8, 9) at 0.18 s
        assert rec.sent[9] - rec.sent[0] >= 0.18 - 1e-3
        assert rec.sent[12] == rec.sent[9] or rec.sent[12] - rec.sent[9] < 0.05  # silence follows at once
        assert rec.first_text == rec.sentence_ready == rec.sent[0]
        assert rec.ttfa_s is not None and rec.ttfa_s > 0
    assert fig["tokens_per_s_sent"] > 0


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_cli_against_a_running_service(tiny_vocoder_service, capsys):
    from bench.vocoder_load import main

    assert main(["--target", tiny_vocoder_service.target, "--concurrency", "1,2", "--modes", "fast,60",
                 "--requests", "2", "--warmup", "0", "--sentences", "1", "--sentence-tokens", "6"]) == 0
    out = capsys.readouterr().out
    runs = json.loads(out[out.index("\n{") + 1:])
    assert set(runs) == {"fast", "60"} and runs["60"]["spec"]["rate_tps"] == 60.0
    for run in runs.values():
        for level in run["levels"].values():
            assert level["ok"] == level["requests"] == 2
            assert math.isclose(level["audio_s"], 2 * 9 * SECONDS_PER_TOKEN, abs_tol=1e-3)
    assert "| mode | streams |" in out
    with pytest.raises(SystemExit):
        main(["--target", tiny_vocoder_service.target, "--modes", "slow"])
    with pytest.raises(SystemExit):
        main(["--target", "10.1.2.3:50052"])  # loopback only unless --allow-remote


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_vocoder_only_section_on_cpu_tiny(demo_tiny_dir, tmp_path):
    results: dict = {}
    vocoder_only_section(demo_tiny_dir, [1, 2], results, device="cpu", modes=("fast", "burst"),
                         log_dir=tmp_path, stats_log_s=0.5, level_time_s=20, sentence_tokens=10,
                         ready_timeout_s=180)
    out = results["vocoder_only"]
    assert out["exit_code"] == 0 and out["startup_s"] > 0
    assert set(out["modes"]) == {"fast", "burst"} and out["modes"]["burst"]["rate_tps"] == 100.0
    lines = read_stats(tmp_path / "vocoder-service.log")
    assert len(lines) == out["stats_lines"] >= 2 and lines[-1].get("final") is True
    for mode in out["modes"].values():
        for n, fig in mode["levels"].items():
            assert fig["ok"] == fig["requests"] == 2 * n and fig["errors"] == 0, fig
            st = fig["engine_stats"]["vocoder_service"]
            assert st["lines"] >= 1, st
            assert st["delta"]["tokens"] > 0 and st["mean"]["push_rows"] >= 1 and 0 < st["busy_frac"] <= 1.0
            assert "queue_wait_ms" in st["mean"] and "step_ms" in st["window"]
    json.dumps(out)  # the GPU bench writes it as JSON
