"""tts_common.cuda_capture: the capture mode switch and the process-wide capture lock (co-located mode)."""

from __future__ import annotations

import threading
import time

from tts_common import cuda_capture


def test_mode_is_torch_default_until_the_context_is_shared(monkeypatch):
    monkeypatch.setattr(cuda_capture, "_mode", "global")  # restored after the test
    assert cuda_capture.capture_error_mode() == "global"
    cuda_capture.share_cuda_context()
    assert cuda_capture.capture_error_mode() == "thread_local"


def test_exclusive_capture_runs_one_capture_at_a_time():
    inside, overlaps = [0], []

    @cuda_capture.exclusive_capture
    def capture(tag: str) -> str:
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.05)
        inside[0] -= 1
        return tag

    threads = [threading.Thread(target=capture, args=(str(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert overlaps == [1, 1, 1, 1]
    assert capture("x") == "x" and capture.__name__ == "capture"


def test_reentrant_within_one_thread():
    @cuda_capture.exclusive_capture
    def outer() -> int:
        return inner() + 1

    @cuda_capture.exclusive_capture
    def inner() -> int:
        return 1

    assert outer() == 2  # e.g. a capture that falls back and captures another shape
