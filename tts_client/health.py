"""Wait for a service process to answer the standard gRPC health check (demo, bench, tests)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_healthy(target: str, proc: subprocess.Popen | None, timeout_s: float, what: str,
                 log_path: Path | None = None, interval_s: float = 0.2) -> None:
    """Block until ``target``'s health check says SERVING.

    Raises ``RuntimeError`` naming ``what`` if ``proc`` exits first (with the tail of ``log_path``)
    or if ``timeout_s`` passes (with the log's path).
    """
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
                raise RuntimeError(f"the {what} exited with code {proc.returncode} before it was healthy"
                                   f"{f'; its log ({log_path})' if log_path else ''}:\n{tail}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {what} at {target} was not healthy after {timeout_s:.0f} s"
                                   f"{f' (log: {log_path})' if log_path else ''}")
            time.sleep(interval_s)
