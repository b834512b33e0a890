"""Run Triton kernel checks on CPU under Triton's interpreter, in a child process.

``TRITON_INTERPRET=1`` must be set before Triton is imported, and a pytest process may have imported it
already (a GPU run of the same tests must not get the interpreter at all), so a test module that checks
kernels runs itself as a script in a child process with the variable set: the child calls
:func:`run_checks` (one JSON line ``RESULTS {name: null | traceback}`` on stdout), the parent's fixture
calls :func:`child_results` and parametrises one test per check over its answer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_checks(checks: dict[str, Callable[[], None]]) -> None:
    """Child process: run every check, print ``RESULTS`` + {name: None | the traceback}."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "the interpreter child needs TRITON_INTERPRET=1"
    results = {}
    for name, fn in checks.items():
        try:
            fn()
            results[name] = None
        except Exception:  # noqa: BLE001 - reported to the parent
            results[name] = traceback.format_exc()
    print("RESULTS " + json.dumps(results))


def child_results(test_file: str, timeout_s: float) -> dict[str, str | None]:
    """Parent: run ``test_file`` as a script with the interpreter on (no GPU visible); its results."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, test_file], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS "):])
