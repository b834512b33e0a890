"""Co-located mode (token_service/colocated.py): both services in one process, one CUDA context.

The real entry point (``python -m token_service serve-colocated``) as a subprocess on the tiny demo
checkpoint: a seeded synthesis through the token service's public RPC equals, sample for sample, what
the two-server pair returns on the same engines' settings; SIGTERM drains both servers and exits 0; a
token server that cannot bind stops the vocoder and exits 1. Bad settings exit 2 with a message that
names the setting (in process, before any model loads).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from service_pair import real_engines

from token_service.colocated import ColocatedConfig, loopback_target, main, vocoder_config
from tts_client.client import make_config, synthesize
from tts_client.health import wait_healthy
from tts_common.config import load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TEXT = "Hello there, friend. This is a streaming test!"
MAX_NEW = 40  # speech tokens per sentence (the client caps it; the server cap is SERVER_MAX_NEW)
SERVER_MAX_NEW, KV_SLOTS, MAX_SEQ_LEN = 300, 4, 1024  # = real_engines' settings, so both sides sample alike


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir: Path, port: int, log_path: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TTS_", "OTEL_"))}
    cmd = [sys.executable, "-m", "token_service", "serve-colocated", "--model-dir", str(model_dir), "--device", "cpu",
           "--listen", f"127.0.0.1:{port}", "--kv-slots", str(KV_SLOTS), "--max-new-tokens", str(SERVER_MAX_NEW),
           "--max-seq-len", str(MAX_SEQ_LEN), "--drain-seconds", "5", "--log-format", "json", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


@pytest.fixture(scope="module")
def engines(demo_tiny_dir):
    yield from real_engines(demo_tiny_dir, kv_slots=KV_SLOTS, max_new_tokens=SERVER_MAX_NEW, max_seq_len=MAX_SEQ_LEN)


def test_colocated_process_equals_two_servers_and_drains(demo_tiny_dir, tmp_path, make_pair, engines):
    port, log_path = _free_port(), tmp_path / "colocated.log"
    proc = _start(demo_tiny_dir, port, log_path, "--vocoder-flags", "--max-streams 4 --max-batch 8")
    try:
        wait_healthy(f"127.0.0.1:{port}", proc, 120, "co-located services", log_path)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            got = synthesize(ch, TEXT, make_config(seed=5, max_new_tokens=MAX_NEW, encoding="float32"),
                             stream_text=True, piece_interval=0.01, timeout=120)
    finally:
        code = _stop(proc)
    assert code == 0, log_path.read_text()[-3000:]

    # the same synthesis through the two-server layout (separate servers and loops, same engine settings)
    pair = make_pair(token_engine=engines[0], vocoder_engine=engines[1], make_sampling=None)
    with grpc.insecure_channel(pair.token.target) as ch:
        ref = synthesize(ch, TEXT, make_config(seed=5, max_new_tokens=MAX_NEW, encoding="float32"),
                         stream_text=True, piece_interval=0.01, timeout=120)
    s = got.summary
    assert s.sentences == 2 and s.speech_tokens > 0
    assert got.samples == s.audio_samples == 960 * s.speech_tokens
    assert np.abs(got.audio()).max() > 0
    assert s.speech_tokens == ref.summary.speech_tokens
    np.testing.assert_array_equal(got.audio(), ref.audio())

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    msgs = [(line["msg"], line.get("service_name")) for line in lines]
    # vocoder up first, token service pointed at it; on SIGTERM token drains first, then the vocoder
    assert [m for m in msgs if m[0] in ("serving", "draining", "stopped")] == [
        ("serving", "vocoder-service"), ("serving", "token-service"),
        ("draining", "token-service"), ("stopped", "token-service"),
        ("draining", "vocoder-service"), ("stopped", "vocoder-service")], msgs
    colocated = next(line for line in lines if line["msg"] == "co-located")
    assert colocated["vocoder_target"].startswith("127.0.0.1:")
    assert all(line["level"] != "ERROR" for line in lines)


def test_token_server_that_cannot_bind_stops_the_vocoder_and_exits_1(demo_tiny_dir, tmp_path):
    with socket.socket() as taken:  # a port someone else holds (no SO_REUSEPORT on our side)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port, log_path = taken.getsockname()[1], tmp_path / "colocated.log"
        proc = _start(demo_tiny_dir, port, log_path)
        try:
            code = proc.wait(90)
        finally:
            _stop(proc)
    out = log_path.read_text()
    assert code == 1, out[-3000:]
    assert f"tts-colocated: token service failed to start (--listen 127.0.0.1:{port}): " in out
    msgs = [json.loads(line)["msg"] for line in out.splitlines() if line.startswith("{")]
    assert msgs.count("serving") == 1 and "stopped" in msgs and msgs[-1].startswith("startup failed"), msgs


@pytest.fixture
def no_tts_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TTS_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("argv, env, message", [
    (["--vocoder-flags", "--device cpu"], {}, "--device cannot be set for the vocoder alone"),
    (["--vocoder-flags", "--log-level DEBUG"], {}, "--log-level cannot be set for the vocoder alone"),
    (["--vocoder-flags", "--bogus 1"], {}, "unknown vocoder flag --bogus"),
    (["--vocoder-flags", "--log-format text"], {}, "--log-format cannot be set for the vocoder alone"),
    (["--vocoder-flags", "--max-batch 0"], {}, "vocoder (--vocoder-flags / TTS_VOCODER_FLAGS): max_batch must be > 0"),
    (["--vocoder-flags", "--dtype float8"], {}, "'float8' is not one of"),
    (["--vocoder-flags", "--dtype 'float16"], {}, "cannot split"),
    (["--vocoder-flags", "float16"], {}, "'float16' is not a flag"),
    (["--vocoder-flags=--cuda-graphs"], {}, "--cuda-graphs needs a value"),
    ([], {"TTS_VOCODER_FLAGS": "--engine tensorrt"}, "engine=tensorrt needs --engine-dir"),
    ([], {"TTS_VOCODER_TARGET": "localhost:50052"}, "--vocoder-target / TTS_VOCODER_TARGET is 'localhost:50052'"),
])
def test_bad_settings_exit_2_naming_the_setting(no_tts_env, monkeypatch, capsys, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["--model-dir", "/nonexistent", *argv]) == 2
    assert message in capsys.readouterr().err


def test_vocoder_settings_come_from_vocoder_flags_not_the_env():
    env = {"TTS_MAX_STREAMS": "3", "TTS_DTYPE": "bfloat16", "TTS_DEVICE": "cpu", "TTS_DRAIN_SECONDS": "7",
           "TTS_VOCODER_FLAGS": "--max-batch=5 --listen unix:/tmp/colocated-test.sock --drain-seconds 2"}
    cfg = load_config(ColocatedConfig, ["--model-dir", "/m", "--stats-log-s", "1.5"], env)
    vcfg = vocoder_config(cfg)
    assert (cfg.max_streams, cfg.dtype, cfg.drain_seconds) == (3, "bfloat16", 7.0)
    # vocoder: its own defaults where the token service's TTS_* would have clashed, its flags, inherited paths
    assert (vcfg.max_streams, vcfg.dtype, vcfg.max_batch) == (128, "auto", 5)
    assert (vcfg.model_dir, vcfg.device, vcfg.stats_log_s, vcfg.drain_seconds) == ("/m", "cpu", 1.5, 2.0)
    assert vcfg.listen == "unix:/tmp/colocated-test.sock"
    assert vocoder_config(load_config(ColocatedConfig, ["--model-dir", "/m"], {})).listen == "127.0.0.1:0"


def test_loopback_target():
    assert loopback_target("127.0.0.1:0", 4321) == "127.0.0.1:4321"
    assert loopback_target("0.0.0.0:50052", 50052) == "127.0.0.1:50052"
    assert loopback_target("[::]:0", 99) == "127.0.0.1:99"
    assert loopback_target("unix:/tmp/v.sock", 1) == "unix:/tmp/v.sock"
