"""CUDA-graph captures when more than one engine thread shares a CUDA context (co-located mode).

A capture in torch's default ``capture_error_mode="global"`` is invalidated by CUDA work that ANY host
thread issues meanwhile (and that thread's unsafe calls, e.g. ``cudaMalloc``, fail). A service process
with one engine has one CUDA thread, so that never happens; in co-located mode
(token_service/colocated.py) the token engine's step thread and the vocoder's worker share one context,
and either captures at run time (a KV slot group added under load, a vocoder chunk shape first seen).
So the capture sites call

    with torch.cuda.graph(cg, pool=pool, capture_error_mode=capture_error_mode()): ...

and wrap their whole capture (warm-up, device syncs, capture) in ``@exclusive_capture``. The
co-located launcher calls ``share_cuda_context()`` before loading the engines: captures then use
``"thread_local"`` (only the capturing thread's own unsafe calls fail it), and the lock keeps one
engine's device-wide ``torch.cuda.synchronize()`` out of the other's capture. In a process with one
engine nothing changes (``"global"``; the lock is never contended).
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

_lock = threading.RLock()
_mode = "global"


def capture_error_mode() -> str:
    """The ``capture_error_mode`` for ``torch.cuda.graph``: ``"global"``, or ``"thread_local"`` once
    ``share_cuda_context()`` ran."""
    return _mode


def share_cuda_context() -> None:
    """Declare that several engine threads share this process's CUDA context (call before loading them)."""
    global _mode
    _mode = "thread_local"


def exclusive_capture(fn: F) -> F:
    """Run ``fn`` (a whole capture: warm-up, syncs, ``torch.cuda.graph``) under one process-wide lock."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with _lock:
            return fn(*args, **kwargs)

    return locked  # type: ignore[return-value]
