"""The cpu-demo manifests' own settings start the real services, and the probes the manifests declare
get SERVING from them; SIGTERM ends them well inside the pod's termination grace period.

The containers' commands and environment are taken from the rendered cpu-demo overlay; only what
must differ on a test machine is replaced: the model folder (the tiny demo instead of the turbo one
the init container writes), loopback listen addresses, the vocoder target (still a ``dns:///``
target, as in the cluster) and telemetry (off: there is no collector here).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy_support import (
    TOKEN_CONTAINER,
    TOKEN_DEPLOYMENT,
    VOCODER_CONTAINER,
    VOCODER_DEPLOYMENT,
    container,
    container_env,
    one,
)

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(docs, deployment: str, name: str) -> tuple[dict, dict]:
    pod = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    return pod, container(pod, name)


def _start(c: dict, env: dict[str, str], log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / c["command"][0]
    assert exe.is_file(), f"console script {exe} is not installed"
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TTS_", "OTEL_"))}
    full.update(env)
    with log.open("w") as out:
        return subprocess.Popen([str(exe), *c["command"][1:], *c.get("args", [])], env=full, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _status(port: int, service: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError as e:
            return e.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def _probes(c: dict) -> list[str]:
    return [c[k]["grpc"].get("service", "") for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c]


def test_cpu_demo_settings_serve_and_drain(rendered, demo_tiny_dir, tmp_path):
    docs = rendered["cpu-demo"]
    vpod, vc = _spec(docs, VOCODER_DEPLOYMENT, VOCODER_CONTAINER)
    tpod, tc = _spec(docs, TOKEN_DEPLOYMENT, TOKEN_CONTAINER)
    vport, tport = _free_port(), _free_port()
    local = {"TTS_MODEL_DIR": str(demo_tiny_dir), "OTEL_SDK_DISABLED": "true"}
    venv = {k: v for k, v in container_env(docs, vc).items() if k.startswith("TTS_")}
    tenv = {k: v for k, v in container_env(docs, tc).items() if k.startswith("TTS_")}
    assert tenv["TTS_VOCODER_TARGET"].startswith("dns:///")
    venv.update(local, TTS_LISTEN=f"127.0.0.1:{vport}")
    tenv.update(local, TTS_LISTEN=f"127.0.0.1:{tport}", TTS_VOCODER_TARGET=f"dns:///127.0.0.1:{vport}")
    procs = {"vocoder": _start(vc, venv, tmp_path / "vocoder.log"), "token": _start(tc, tenv, tmp_path / "token.log")}
    try:
        checks = [(vport, s) for s in _probes(vc)] + [(tport, s) for s in _probes(tc)]
        deadline = time.monotonic() + 120
        while True:
            states = {(p, s): _status(p, s) for p, s in checks}
            if all(v == "SERVING" for v in states.values()):
                break
            for name, p in procs.items():
                assert p.poll() is None, f"{name} exited: {(tmp_path / f'{name}.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"probes never all SERVING: {states}"
            time.sleep(0.5)
        # Kubernetes: preStop sleep, then SIGTERM, then SIGKILL at terminationGracePeriodSeconds.
        for name, pod, c in (("vocoder", vpod, vc), ("token", tpod, tc)):
            sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
            budget = pod["terminationGracePeriodSeconds"] - sleep
            t0 = time.monotonic()
            procs[name].send_signal(signal.SIGTERM)
            try:
                rc = procs[name].wait(timeout=budget)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still running {budget}s after SIGTERM (would be SIGKILLed)")
            assert rc == 0, f"{name} exited {rc} after SIGTERM: {(tmp_path / f'{name}.log').read_text()[-2000:]}"
            assert time.monotonic() - t0 < budget
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
