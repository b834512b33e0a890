"""`make demo`'s script with the tiny checkpoint: real processes, health, SIGTERM drain, the CLI, a WAV.

Runs ``python -m tts_client.demo`` (both services as subprocesses on free loopback ports, a
synthesis with the text streamed, a WAV, SIGTERM to both), then checks the WAV and that both
services logged a clean drain in JSON.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_demo_script_with_tiny_checkpoint(demo_tiny_dir, tmp_path):
    out = tmp_path / "demo.wav"
    env = {**os.environ, "TTS_MODEL_DIR": str(demo_tiny_dir), "DEMO_OUT": str(out), "DEMO_MAX_NEW_TOKENS": "20",
           "DEMO_LOGS": str(tmp_path / "logs"),
           "TTS_DEVICE": "cpu"}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    proc = subprocess.run([sys.executable, "-m", "tts_client.demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "random weights" in proc.stdout and "real-time factor" in proc.stdout
    wav = out.read_bytes()
    assert wav[:4] == b"RIFF" and struct.unpack("<HHI", wav[20:28]) == (1, 1, 24000)
    n_samples = struct.unpack("<I", wav[40:44])[0] // 2
    tokens = int(proc.stdout.split(", speech tokens ")[1].split()[0])
    assert n_samples == 960 * tokens and tokens > 0
    for name in ("token-service", "vocoder-service"):
        lines = [json.loads(line) for line in (tmp_path / "logs" / f"{name}.log").read_text().splitlines()
                 if line.startswith("{")]
        msgs = [line["msg"] for line in lines]
        assert "serving" in msgs and "draining" in msgs and msgs[-1] == "stopped", msgs
        assert all(line["level"] != "ERROR" for line in lines)
