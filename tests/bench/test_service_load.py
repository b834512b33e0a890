"""bench/service_load.py: the underrun rule, text pacing, the CLI against a running pair, and the GPU
bench's ``services_section`` run on CPU with the tiny preset (real processes)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from bench.service_load import count_underruns, main, pct, services_section, text_pieces  # noqa: E402


def test_underrun_rule():
    assert count_underruns([]) == (0, 0.0)
    # on time: each chunk arrives before the audio before it runs out
    assert count_underruns([(1.0, 0.5), (1.4, 0.5), (1.9, 0.5), (2.5, 0.5)]) == (0, 0.0)
    # one late chunk counts once; playback resumes from its arrival, so the next chunk is judged from there
    n, stalled = count_underruns([(1.0, 0.5), (2.0, 0.5), (2.4, 0.5), (3.5, 1.0)])
    assert n == 2 and math.isclose(stalled, 0.5 + 0.5)  # 2.0 vs 1.5; then 3.5 vs 2.5 + 0.5
    # exactly at the boundary is not late; tolerance absorbs jitter
    assert count_underruns([(0.0, 1.0), (1.0, 1.0)]) == (0, 0.0)
    assert count_underruns([(0.0, 1.0), (1.05, 1.0)], tolerance=0.1) == (0, 0.0)
    assert count_underruns([(0.0, 1.0), (1.05, 1.0)])[0] == 1


def test_text_pieces_and_percentiles():
    pieces = text_pieces("Hello there, my friend. How are you?", 3)
    assert "".join(p for p, _ in pieces) == "Hello there, my friend. How are you?"
    assert [p for p, ends in pieces if ends] == ["friend. How are "]  # the piece completing sentence 1
    assert text_pieces("no stop here", 2)[-1][1] is True  # no punctuation: the end of input completes it
    assert pct([3, 1, 2], 50) == 2 and pct([1, 2, 3, 4], 99) == 4 and math.isnan(pct([], 50))


@pytest.mark.integration
def test_cli_against_a_running_pair(capsys):
    from fakes import FakeSampling, FakeTokenEngine, fake_vocoder_engine
    from harness import RunningService

    vocoder = RunningService("vocoder", fake_vocoder_engine(step_delay=0.005), {})
    token = RunningService("token", FakeTokenEngine(step_delay=0.005), {"vocoder_target": vocoder.target},
                           make_sampling=FakeSampling)
    try:
        assert main(["--target", token.target, "--concurrency", "1,3", "--requests", "4", "--warmup", "1",
                     "--piece-gap-ms", "5"]) == 0
    finally:
        token.stop()
        vocoder.stop()
    out = capsys.readouterr().out
    run = json.loads(out[out.index("\n{") + 1:])
    assert set(run["levels"]) == {"1", "3"}
    for n, level in run["levels"].items():
        assert level["requests"] == level["ok"] == 4 and level["errors"] == 0
        assert 1 <= level["streams_held"] <= int(n)
        assert level["ttfa_p50_ms"] > 0 and level["audio_s"] > 0 and level["audio_s_per_s"] > 0
    assert "| concurrency |" in out
    with pytest.raises(SystemExit):
        main(["--target", "10.1.2.3:50051"])  # loopback only unless --allow-remote


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_services_section_on_cpu_tiny(demo_tiny_dir, tmp_path):
    results: dict = {}
    services_section(demo_tiny_dir, [1, 2], results, device="cpu", max_new_tokens=10, c1_requests=3,
                     level_time_s=20, log_dir=tmp_path, ready_timeout_s=180, stats_log_s=0.5)
    svc = results["services"]
    assert svc["exit_codes"] == {"token_service": 0, "vocoder_service": 0}
    assert svc["ttfa_c1_p50_ms"] > 0 and svc["ttfa_c1_p90_ms"] >= svc["ttfa_c1_p50_ms"]
    assert svc["rtf"] > 0
    assert svc["c1"]["ok"] == 3
    assert set(svc["sweep"]) == {1, 2}
    for n, level in svc["sweep"].items():
        assert level["errors"] == 0 and level["ok"] == level["requests"] == 2 * n, level
        for key in ("ttfa_p50_ms", "ttfa_p99_ms", "underruns", "audio_s_per_s", "errors"):  # bench/gpu_bench.py's keys
            assert key in level
    assert set(svc["gpu_mem_MB"]) >= {"total"}  # None values on a machine without nvidia-smi
    # TTS_STATS_LOG_S: both engines' statistics cut per level from the services' logs
    for level in [svc["c1"], *svc["sweep"].values()]:
        voc, tok = level["engine_stats"]["vocoder_service"], level["engine_stats"]["token_service"]
        assert voc["lines"] >= 1 and voc["delta"]["tokens"] > 0 and voc["mean"]["push_rows"] >= 1, voc
        assert 0 < voc["busy_frac"] <= 1.0 and "queue_wait_ms" in voc["mean"]
        assert tok["lines"] >= 1 and tok["delta"]["tokens"] > 0 and tok["per_s"]["steps"] > 0, tok
    assert all(v > 0 for v in svc["rss_MB"]["end"].values())


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_services_section_colocated_on_cpu_tiny(demo_tiny_dir, tmp_path):
    """--colocate: one process serves both; its memory is both services' total; stats split per service."""
    results: dict = {}
    services_section(demo_tiny_dir, [1], results, device="cpu", max_new_tokens=10, c1_requests=2, level_time_s=10,
                     log_dir=tmp_path, ready_timeout_s=180, stats_log_s=0.5, key="services_colocated",
                     vocoder_flags=["--max-batch", "4"], colocate=True)
    svc = results["services_colocated"]
    assert svc["config"]["colocate"] is True
    assert svc["exit_codes"] == {"colocated": 0}
    assert svc["c1"]["ok"] == 2 and svc["sweep"][1]["ok"] == svc["sweep"][1]["requests"] == 2
    assert set(svc["gpu_mem_MB"]) == {"colocated", "total"}  # None values without nvidia-smi
    assert set(svc["rss_MB"]["end"]) == {"colocated"}
    for level in (svc["c1"], svc["sweep"][1]):  # one log, cut by logger into each service's statistics
        voc, tok = level["engine_stats"]["vocoder_service"], level["engine_stats"]["token_service"]
        assert voc["lines"] >= 1 and voc["mean"]["push_rows"] >= 1 and voc["delta"]["opened_sessions"] > 0, voc
        assert tok["lines"] >= 1 and tok["per_s"]["steps"] > 0, tok
        assert "opened_sessions" not in tok["delta"] and "push_rows" not in tok.get("mean", {}), tok
    with pytest.raises(ValueError, match="cannot apply to the vocoder alone"):
        services_section(demo_tiny_dir, [1], {}, device="cpu", vocoder_env={"X": "1"}, colocate=True)
