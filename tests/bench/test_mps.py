"""bench/mps.py: where MPS cannot start, the bench learns why instead of hanging or crashing."""
from __future__ import annotations

import pytest

from bench import mps


def test_missing_control_binary_is_reported(monkeypatch):
    monkeypatch.setattr(mps.shutil, "which", lambda name: None)
    with pytest.raises(mps.MpsUnavailable, match="not on PATH"):
        with mps.mps_daemon():
            pass


def test_daemon_that_fails_to_start_is_reported(monkeypatch, tmp_path):
    script = tmp_path / "nvidia-cuda-mps-control"
    script.write_text("#!/bin/sh\necho 'no GPU here' >&2\nexit 3\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(mps.MpsUnavailable, match="exited 3: no GPU here"):
        with mps.mps_daemon():
            pass


def test_client_environment_points_into_the_private_folder(tmp_path):
    env = mps.mps_env(tmp_path)
    assert env == {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log")}
