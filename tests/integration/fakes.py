"""Small fakes of the engine contracts (docs/ARCHITECTURE.md), for server tests that need no model.

They keep the contracts' observable rules: the token engine holds a "KV slot" from the first step of
a stream until it ends or is closed; the vocoder backend returns 960 samples per token in total,
holding one token back until the next push (as a look-ahead model does).
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np


@dataclasses.dataclass
class FakeSampling:
    temperature: float = 0.8
    top_k: int = 1000
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    max_new_tokens: int = 1000
    seed: int | None = None


class FakeTokenEngine:
    """Speech tokens = a deterministic function of (text ids, seed); 2 per text token, chunks of 4."""

    def __init__(self, voices=("default", "other"), slots: int = 8, max_text_tokens: int = 200,
                 step_delay: float = 0.0, chunk: int = 4):
        self._voices = list(voices)
        self.slots = slots
        self.max_text_tokens = max_text_tokens
        self.step_delay = step_delay
        self.chunk = chunk
        self.active = 0
        self.finished = 0

    def voices(self):
        return list(self._voices)

    def tokenize(self, text: str) -> list[int]:
        if not text.strip():
            raise ValueError("text is empty")
        ids = [ord(c) % 50000 for c in text]
        if len(ids) > self.max_text_tokens:
            raise ValueError(f"text is too long: {len(ids)} tokens, the limit is {self.max_text_tokens}")
        return ids

    async def generate(self, voice, text_ids, sampling):
        if voice not in self._voices:
            raise KeyError(voice)
        rng = np.random.default_rng([sampling.seed if sampling.seed is not None else 12345, sum(text_ids)])
        n = min(2 * len(text_ids), sampling.max_new_tokens)
        tokens = rng.integers(0, 6561, n).tolist()
        self.active += 1
        try:
            for i in range(0, n, self.chunk):
                await asyncio.sleep(self.step_delay)
                yield tokens[i:i + self.chunk]
        finally:
            self.active -= 1
            self.finished += 1

    def stats(self):
        return {"active": self.active, "free_slots": self.slots - self.active}


class FakeVocoderBackend:
    """Synchronous streaming session: audio depends on token ids and seed; one token held back."""

    opened = 0
    closed = 0

    def __init__(self, voice: str, seed, step_delay: float = 0.0):
        self.seed = 0 if seed is None else seed
        self.voice = voice
        self.held: list[int] = []
        self.step_delay = step_delay
        FakeVocoderBackend.opened += 1

    def _audio(self, ids):
        out = [np.sin(np.arange(960, dtype=np.float32) * (1 + t % 97) / 300.0 + self.seed) * 0.5 for t in ids]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def push(self, ids):
        import time
        time.sleep(self.step_delay)
        ids = self.held + list(ids)
        self.held = ids[-1:]
        return self._audio(ids[:-1])

    def finish(self):
        ids, self.held = self.held, []
        return self._audio(ids)

    def close(self):
        FakeVocoderBackend.closed += 1


def fake_vocoder_engine(voices=("default", "other"), step_delay: float = 0.0):
    from vocoder_service.engine import VocoderEngine

    return VocoderEngine(lambda voice, seed: FakeVocoderBackend(voice, seed, step_delay), list(voices))
