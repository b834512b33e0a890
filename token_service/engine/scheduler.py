"""Continuous batching: sequences take a free KV slot when they arrive and give it back when done.

The running batch changes between decode steps: new sequences are admitted (prefilled) at the
start of a step, finished or cancelled ones leave at once. Slots are handed out lowest-first so
the running set stays packed at the front of the cache: a decode step runs cache rows
``0 .. max_running_slot`` (rounded up to a captured batch size), without gathering.

Thread safety: every method is called with the engine's lock held.
"""
from __future__ import annotations

import heapq
from collections import deque

from .sequence import Sequence, SeqStatus


class EngineOverloaded(RuntimeError):
    """More requests are waiting than the engine accepts; try again later."""


class Scheduler:
    def __init__(self, max_slots: int, max_waiting: int, max_prefills_per_step: int):
        self.max_slots = max_slots
        self.max_waiting = max_waiting
        self.max_prefills_per_step = max_prefills_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._free: list[int] = list(range(max_slots))
        heapq.heapify(self._free)
        self._released: list[int] = []  # slots freed since the engine thread last looked

    # -------------------------------------------------------------- requests
    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise EngineOverloaded(f"engine is full: {len(self.running)} running and {len(self.waiting)} waiting "
                                   f"(max_slots={self.max_slots}, max_waiting={self.max_waiting})")
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots (lowest first); returns the admitted ones."""
        admitted = []
        while self.waiting and self._free and len(admitted) < self.max_prefills_per_step:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free)
            seq.status = SeqStatus.RUNNING
            self.running[seq.slot] = seq
            admitted.append(seq)
        return admitted

    def finish(self, seq: Sequence) -> bool:
        """Release ``seq`` (finished, cancelled or failed). Returns False if it was already released."""
        if seq.status is SeqStatus.FINISHED:
            return False
        if seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            heapq.heappush(self._free, seq.slot)
            self._released.append(seq.slot)
        seq.status = SeqStatus.FINISHED
        return True

    def take_released(self) -> list[int]:
        out, self._released = self._released, []
        return out

    # -------------------------------------------------------------- views
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def decode_batch(self) -> list[Sequence]:
        """Running sequences that have been prefilled (ordered by slot)."""
        return [s for _, s in sorted(self.running.items()) if s.prefilled]

    @property
    def free_slots(self) -> int:
        return len(self._free)
