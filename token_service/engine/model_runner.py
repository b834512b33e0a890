"""Runs T3 for the engine: per-sequence prefill and one batched decode step over cache slots.

State on the device, one row per KV slot (``max_slots`` rows):
``tokens`` (last sampled id), ``positions`` (where it is written next), ``active`` (0/1),
sampling parameters, ``step`` (tokens sampled so far, the RNG counter) and ``seen`` (the
repetition-penalty id set, see ``t3.sampling``). A decode step over rows ``0 .. B-1`` reads and
updates only these tensors, so it has no host inputs at all: on CUDA it is captured once per
(batch size, KV length) bucket in a CUDA graph and replayed; on CPU it runs eagerly. The only
host sync per step is reading the ``B`` sampled ids back, which streaming needs anyway.

Inactive rows inside ``0 .. B-1`` compute garbage that is ignored; their position does not move
(``positions += active``), so they never index past the cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..t3.config import START_SPEECH
from ..t3.generate import decode_step, prefill
from ..t3.model import KVCache, T3Model
from ..t3.sampling import process_logits, row_values, sample, seed32, vocab_hash
from ..t3.voice import VoicePrefix
from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerShape:
    max_slots: int
    max_seq_len: int
    graph_batch_sizes: tuple[int, ...]  # decode batch buckets (sorted); the last must be >= max_slots
    kv_bucket: int  # decode attends to the cache rounded up to a multiple of this
    cuda_graphs: bool


class ModelRunner:
    def __init__(self, model: T3Model, shape: RunnerShape, device: torch.device, dtype: torch.dtype):
        self.model, self.shape, self.device, self.dtype = model, shape, device, dtype
        cfg = model.cfg
        n, V = shape.max_slots, cfg.speech_vocab_size
        self.cache = KVCache(cfg, n, shape.max_seq_len, device=device, dtype=dtype)
        z = dict(device=device)
        self.tokens = torch.zeros(n, dtype=torch.long, **z)
        self.positions = torch.zeros(n, dtype=torch.long, **z)
        self.active = torch.zeros(n, dtype=torch.long, **z)
        self.step = torch.zeros(n, dtype=torch.long, **z)
        self.seed = torch.zeros(n, dtype=torch.long, **z)
        self.temperature = torch.ones(n, dtype=torch.float32, **z)
        self.top_k = torch.full((n,), V, dtype=torch.long, **z)
        self.top_p_threshold = torch.zeros(n, dtype=torch.float32, **z)
        self.top_p_on = torch.zeros(n, dtype=torch.bool, **z)
        self.penalty = torch.ones(n, dtype=torch.float32, **z)
        self.seen = torch.zeros(n, V, dtype=torch.bool, **z)
        self.rows = torch.arange(n, **z)
        self.sampled = torch.zeros(n, dtype=torch.long, **z)  # output of the last decode step
        self.vhash = vocab_hash(V, device)
        self._true = torch.ones((), dtype=torch.bool, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if shape.cuda_graphs and device.type == "cuda":
            self.capture_graphs()

    # ------------------------------------------------------------------ buckets
    def batch_bucket(self, n_rows: int) -> int:
        for b in self.shape.graph_batch_sizes:
            if b >= n_rows:
                return min(b, self.shape.max_slots)
        return self.shape.max_slots

    def kv_bucket(self, n_positions: int) -> int:
        k = self.shape.kv_bucket
        return min(self.shape.max_seq_len, -(-n_positions // k) * k)

    def _kv_buckets(self) -> list[int]:
        k, L = self.shape.kv_bucket, self.shape.max_seq_len
        return sorted({min(L, m) for m in range(k, L + k, k)})

    def graph_keys(self) -> list[tuple[int, int]]:
        """Every (batch bucket, KV bucket) :meth:`decode` can ask for; one CUDA graph each."""
        sizes = sorted({self.batch_bucket(b) for b in self.shape.graph_batch_sizes})
        return [(n, kv) for n in sizes for kv in self._kv_buckets()]

    def decode_key(self, n_rows: int, max_position: int) -> tuple[int, int]:
        """The (batch bucket, KV bucket) a decode over ``n_rows`` rows up to ``max_position`` runs."""
        return self.batch_bucket(n_rows), self.kv_bucket(max_position + 1)

    # ------------------------------------------------------------------ slots
    def activate(self, seq: Sequence, prefix: VoicePrefix) -> None:
        """Reset slot ``seq.slot``'s row state for a new sequence."""
        s, p = seq.slot, row_values(seq.params, self.model.cfg.speech_vocab_size)
        self.temperature[s] = p["temperature"]
        self.top_k[s] = p["top_k"]
        self.top_p_threshold[s] = p["top_p_threshold"]
        self.top_p_on[s] = p["top_p_on"]
        self.penalty[s] = p["penalty"]
        self.seed[s] = seed32(seq.seed)
        self.step[s] = 0
        self.seen[s] = False
        self.seen[s, START_SPEECH] = True  # upstream's input_ids for the first token
        self.active[s] = 0

    def deactivate(self, slots: list[int]) -> None:
        if slots:
            idx = torch.tensor(slots, device=self.device)
            self.active[idx] = 0
            self.positions[idx] = 0

    # ------------------------------------------------------------------ compute
    @torch.inference_mode()
    def prefill(self, seq: Sequence, prefix: VoicePrefix) -> int:
        """Prefill ``seq`` into its slot, sample its first token and arm the slot for decoding."""
        self.activate(seq, prefix)
        s = seq.slot
        ids = torch.tensor(seq.text_ids, dtype=torch.long, device=self.device)
        logits = prefill(self.model, self.cache, s, prefix, ids)[None]  # (1, V)
        row = slice(s, s + 1)
        tok = self._sample(logits, row)  # (1,)
        # upstream: later tokens see only the generated ids (the start token drops out)
        self.seen[s] = False
        self.seen[s, tok[0]] = True
        self.step[s] = 1
        self.tokens[s] = tok[0]
        seq.position = prefix.length + len(seq.text_ids) + 1
        self.positions[s] = seq.position
        self.active[s] = 1
        return int(tok[0])

    def _sample(self, logits: Tensor, rows: slice) -> Tensor:
        scores = process_logits(logits, self.seen[rows], self.temperature[rows], self.top_k[rows],
                                self.top_p_threshold[rows], self.top_p_on[rows], self.penalty[rows])
        return sample(scores.softmax(dim=-1), self.seed[rows], self.step[rows], self.vhash)

    def _decode_body(self, n: int, kv_len: int) -> None:
        """One decode step over rows ``0..n-1``, entirely on the device (the captured region)."""
        logits = decode_step(self.model, self.cache, n, self.tokens[:n], self.positions[:n], kv_len)
        tok = self._sample(logits, slice(0, n))
        self.tokens[:n] = tok
        self.sampled[:n] = tok
        self.seen.index_put_((self.rows[:n], tok), self._true)
        self.positions[:n] += self.active[:n]
        self.step[:n] += 1

    @torch.inference_mode()
    def decode(self, n_rows: int, max_position: int) -> list[int]:
        """Advance every active slot in rows ``0..n_rows-1`` by one token; returns the sampled ids
        of rows ``0..n_rows-1`` (ignore inactive rows). ``max_position``: the largest position
        any active row writes this step."""
        n, kv_len = self.decode_key(n_rows, max_position)
        graph = self.graphs.get((n, kv_len))
        if graph is not None:
            graph.replay()
        else:
            self._decode_body(n, kv_len)
        return self.sampled[:n_rows].tolist()

    # ------------------------------------------------------------------ CUDA graphs
    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture the decode step for every (batch bucket, KV bucket); state is reset afterwards."""
        keys = self.graph_keys()
        sizes = sorted({n for n, _ in keys})
        pool = None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up (allocator, cuBLAS handles, lazy kernels)
            for n, kv_len in keys:
                self._decode_body(n, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for n, kv_len in reversed(keys):  # largest first so the pool fits the rest
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._decode_body(n, kv_len)
            pool = g.pool()
            self.graphs[(n, kv_len)] = g
        torch.cuda.synchronize(self.device)
        for t in (self.tokens, self.positions, self.active, self.step, self.sampled):
            t.zero_()
        self.seen.zero_()
        log.info("captured %d decode CUDA graphs (batch %s × kv %s)", len(self.graphs), sizes, self._kv_buckets())
