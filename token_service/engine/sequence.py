"""One generation request as the engine tracks it."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from ..t3.sampling import SamplingParams

_ids = itertools.count(1)


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, no KV slot yet
    RUNNING = "running"  # holds a KV slot; prefilled or about to be
    FINISHED = "finished"  # stop token, token budget, cancel or error; slot released


@dataclass(eq=False)
class Sequence:
    """A request: voice, text ids, sampling settings, and its place in the KV cache.

    ``deliver`` is called from the engine thread with a list of new speech ids, with ``None``
    when the stream ends normally, or with an exception; it must be thread-safe.
    """

    voice: str
    text_ids: list[int]
    params: SamplingParams
    seed: int
    deliver: Callable[[object], None] = lambda item: None
    # where ``deliver`` puts items: the consumer's event loop and queue (lets the engine hand one
    # step's items for many streams of a loop over in a single ``call_soon_threadsafe``)
    loop: Any = None
    queue: Any = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SeqStatus = SeqStatus.WAITING
    slot: int = -1
    n_sampled: int = 0  # tokens sampled so far (incl. dropped ids, excl. nothing)
    position: int = 0  # cache position the next fed-back token is written at
    cancelled: bool = False
    prefilled: bool = False

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
