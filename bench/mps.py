"""NVIDIA MPS (Multi-Process Service) for benchmarks that run both services on one GPU.

Without MPS, two processes on one GPU time-slice it: the GPU runs one process's kernels at a time and
switches between them, so T3's short decode steps wait behind the vocoder's long graph replays (bench/NOTES.md
run 42: at 128 streams T3 managed 29 steps/s, 2045 tokens/s, when it decodes ~20x that alone). Under MPS the
kernels of both processes share the SMs concurrently. Kubernetes gets the same with the NVIDIA device
plugin's MPS sharing (docs/DEPLOY.md).

``mps_daemon()`` starts a private control daemon (pipe and log folders under a temporary directory, so it
never touches a system-wide daemon) and yields the environment a client process needs; on exit it asks the
daemon to quit. Where ``nvidia-cuda-mps-control`` is missing or the daemon does not come up, it raises
``MpsUnavailable`` with the reason.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"


class MpsUnavailable(RuntimeError):
    """MPS cannot be started here (no control binary, or the daemon did not start)."""


def mps_env(root: Path) -> dict[str, str]:
    """The environment a client (and the daemon) uses: its pipe and log folders under ``root``."""
    return {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}


def _control(env: dict[str, str], command: str, timeout_s: float = 10.0) -> str:
    res = subprocess.run([CONTROL], input=command + "\n", capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=timeout_s)
    return (res.stdout + res.stderr).strip()


@contextlib.contextmanager
def mps_daemon(start_timeout_s: float = 10.0) -> Iterator[dict[str, str]]:
    """Run a private MPS control daemon for the duration of the block; yields the client environment."""
    if shutil.which(CONTROL) is None:
        raise MpsUnavailable(f"{CONTROL} is not on PATH")
    with tempfile.TemporaryDirectory(prefix="mps-") as tmp:
        root = Path(tmp)
        env = mps_env(root)
        for d in env.values():
            Path(d).mkdir()
        res = subprocess.run([CONTROL, "-d"], capture_output=True, text=True, env={**os.environ, **env}, timeout=30)
        if res.returncode != 0:
            raise MpsUnavailable(f"{CONTROL} -d exited {res.returncode}: {(res.stdout + res.stderr).strip()[:300]}")
        try:
            deadline = time.monotonic() + start_timeout_s
            while not (root / "pipe" / "control").exists():
                if time.monotonic() > deadline:
                    log = (root / "log" / "control.log")
                    raise MpsUnavailable("the MPS control pipe did not appear; control.log: "
                                         + (log.read_text()[-300:] if log.exists() else "(none)"))
                time.sleep(0.05)
            yield env
        finally:
            with contextlib.suppress(Exception):
                _control(env, "quit")
            time.sleep(0.5)


def server_log(env: dict[str, str], limit: int = 2000) -> str:
    """The tail of the daemon's control + server logs (for the bench's results)."""
    out = []
    for name in ("control.log", "server.log"):
        p = Path(env["CUDA_MPS_LOG_DIRECTORY"]) / name
        if p.exists():
            out.append(f"--- {name}\n" + p.read_text()[-limit:])
    return "\n".join(out)
