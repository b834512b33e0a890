"""Runs T3 for the engine: per-sequence prefill and batched decode steps over KV-cache slot groups.

KV memory grows with load. Slots are split into *groups* (``slot_groups``, e.g. 8, 8, 16, 32, 64
for 128 slots); a group's KV cache (``KVCache`` of its size) and its CUDA graphs are created the
first time one of its slots is handed out, and kept. The scheduler hands out slots lowest-first,
so at concurrency 1 only the first group exists (Turbo bf16, 2048 positions, 8 slots: 1.6 GB),
while a busy engine ends up with all of them. A decode step runs one batched step per group that
has running rows (rows ``0 .. B-1`` of the group, ``B`` its smallest batch bucket that covers
them); every group reads the weights once, which costs little next to real time (25 tokens/s).

State on the device, one row per slot (``max_slots`` rows, all groups): ``tokens`` (last sampled
id), ``positions`` (where it is written next), ``active`` (0/1), sampling parameters, ``step``
(tokens sampled so far, the RNG counter) and ``seen`` (the repetition-penalty id set, see
``t3.sampling``). A group's step reads and updates only its slice of these tensors, so it has no
host inputs at all: on CUDA it is captured once per (batch bucket, KV bucket) and replayed; on
CPU it runs eagerly. The only host sync per step is reading the sampled ids back, which
streaming needs anyway.

Sampling uses the top-k fast path (``process_logits_topk``: one ``topk`` instead of two full
sorts) whenever every running row of the group has ``top_k <= TOPK_WIDTH`` (the default 1000
does); other settings run the full-sort path eagerly (no graph).

Prefill on CUDA runs ``[text | start]`` padded to a length bucket (``PREFILL_BUCKETS``) in a
one-slot *staging* cache that holds the voice prefix, captured as one CUDA graph per bucket, then
copies the staging keys/values into the sequence's slot. The padding rows sit after the real ones,
so they never influence them (causal mask); their keys/values land at positions the decode steps
overwrite before anything attends to them. Longer texts, and CPU, prefill eagerly in place.

Inactive rows inside ``0 .. B-1`` compute garbage that is ignored; their position does not move
(``positions += active``), so they never index past the cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..t3.config import START_SPEECH
from ..t3.generate import decode_step, prefill
from ..t3.model import KVCache, T3Model
from ..t3.sampling import (TOPK_WIDTH, process_logits, process_logits_topk, row_values, sample, seed32,
                           vocab_hash)
from ..t3.voice import VoicePrefix
from .sequence import Sequence

log = logging.getLogger(__name__)

PREFILL_BUCKETS = (16, 32, 64, 128, 256)  # padded [text | start] lengths of the CUDA prefill path


def slot_groups(max_slots: int, first: int) -> tuple[int, ...]:
    """Group sizes covering ``max_slots``: ``first, first, 2·first, 4·first, …`` (the last one cut)."""
    first = max(1, min(first, max_slots))
    sizes, total = [], 0
    while total < max_slots:
        size = first if len(sizes) < 2 else sizes[-1] * 2
        size = min(size, max_slots - total)
        sizes.append(size)
        total += size
    return tuple(sizes)


@dataclass(frozen=True)
class RunnerShape:
    max_slots: int
    max_seq_len: int
    graph_batch_sizes: tuple[int, ...]  # decode batch buckets (sorted); each group adds its own size
    kv_bucket: int  # decode attends to the cache rounded up to a multiple of this
    cuda_graphs: bool
    first_group: int = 0  # slots in the first KV group (0 = all slots in one group, allocated at once)
    topk_width: int = TOPK_WIDTH
    staged_prefill: bool | None = None  # padded staging-slot prefill; None = on CUDA only


@dataclass
class SlotGroup:
    """Slots ``start .. start+size-1``: their KV cache (``None`` until first used) and CUDA graphs."""

    start: int
    size: int
    batch_sizes: tuple[int, ...]
    cache: KVCache | None = None
    graphs: dict[tuple[int, int], "torch.cuda.CUDAGraph"] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: T3Model, shape: RunnerShape, device: torch.device, dtype: torch.dtype):
        self.model, self.shape, self.device, self.dtype = model, shape, device, dtype
        cfg = model.cfg
        n, V = shape.max_slots, cfg.speech_vocab_size
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
        self.row_top_k = [V] * n  # host copy: picks the sampler path per step
        self.use_graphs = shape.cuda_graphs and device.type == "cuda"
        self._pool = None  # one CUDA-graph memory pool for every group
        sizes = slot_groups(n, shape.first_group or n)
        self.groups: list[SlotGroup] = []
        start = 0
        for size in sizes:
            bs = tuple(sorted({b for b in shape.graph_batch_sizes if b < size} | {size}))
            self.groups.append(SlotGroup(start, size, bs))
            start += size
        # CUDA prefill path (staging slot, padded buckets); eager and graph runs compute the same shapes
        P = cfg.prefix_len
        self.prefill_buckets = tuple(b for b in PREFILL_BUCKETS if P + b <= shape.max_seq_len) \
            if (device.type == "cuda" if shape.staged_prefill is None else shape.staged_prefill) else ()
        self.prefill_graphs: dict[int, "torch.cuda.CUDAGraph"] = {}
        if self.prefill_buckets:
            top = self.prefill_buckets[-1]
            self.staging = KVCache(cfg, 1, P + top, device=device, dtype=dtype)
            self._staging_prefix: VoicePrefix | None = None
            self.pf_ids = torch.zeros(top, dtype=torch.long, **z)
            self.pf_len = torch.zeros(1, dtype=torch.long, **z)  # T: where the start token goes
            self.pf_logits = torch.zeros(1, V, dtype=torch.float32, **z)
            self._start_id = torch.full((1,), START_SPEECH, dtype=torch.long, **z)
            if self.use_graphs:
                self.capture_prefill_graphs()
        self.ensure_group(0)

    # ------------------------------------------------------------------ groups, buckets
    def group_of(self, slot: int) -> SlotGroup:
        for g in self.groups:
            if slot < g.start + g.size:
                return g
        raise IndexError(f"slot {slot} >= max_slots {self.shape.max_slots}")

    def ensure_group(self, index: int) -> SlotGroup:
        """Allocate group ``index``'s KV cache (and capture its graphs) if not done yet."""
        g = self.groups[index]
        if g.cache is None:
            g.cache = KVCache(self.model.cfg, g.size, self.shape.max_seq_len, device=self.device, dtype=self.dtype)
            if self.use_graphs:
                self.capture_graphs(g)
            log.info("KV group %d: slots %d..%d allocated (%.2f GB)", index, g.start, g.start + g.size - 1,
                     g.cache.nbytes() / 1e9)
        return g

    @property
    def graphs(self) -> dict[tuple[int, int, int], "torch.cuda.CUDAGraph"]:
        """Every captured graph, keyed (group start, batch bucket, KV bucket)."""
        return {(g.start, n, kv): gr for g in self.groups for (n, kv), gr in g.graphs.items()}

    def kv_nbytes(self) -> int:
        return sum(g.cache.nbytes() for g in self.groups if g.cache is not None)

    def batch_bucket(self, n_rows: int, group: SlotGroup | None = None) -> int:
        group = group or self.groups[0]
        for b in group.batch_sizes:
            if b >= n_rows:
                return b
        return group.size

    def kv_bucket(self, n_positions: int) -> int:
        k = self.shape.kv_bucket
        return min(self.shape.max_seq_len, -(-n_positions // k) * k)

    def _kv_buckets(self) -> list[int]:
        k, L = self.shape.kv_bucket, self.shape.max_seq_len
        return sorted({min(L, m) for m in range(k, L + k, k)})

    def graph_keys(self, group: SlotGroup | None = None) -> list[tuple[int, int]]:
        """Every (batch bucket, KV bucket) a decode of ``group`` can ask for; one CUDA graph each."""
        group = group or self.groups[0]
        return [(n, kv) for n in group.batch_sizes for kv in self._kv_buckets()]

    def decode_key(self, n_rows: int, max_position: int, group: SlotGroup | None = None) -> tuple[int, int]:
        """The (batch bucket, KV bucket) a decode over ``n_rows`` rows of ``group`` up to ``max_position`` runs."""
        return self.batch_bucket(n_rows, group), self.kv_bucket(max_position + 1)

    # ------------------------------------------------------------------ slots
    def activate(self, seq: Sequence, prefix: VoicePrefix) -> None:
        """Reset slot ``seq.slot``'s row state for a new sequence."""
        s, p = seq.slot, row_values(seq.params, self.model.cfg.speech_vocab_size)
        self.temperature[s] = p["temperature"]
        self.top_k[s] = p["top_k"]
        self.row_top_k[s] = int(p["top_k"])
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
        s = seq.slot
        g = self.ensure_group(self.groups.index(self.group_of(s)))
        self.activate(seq, prefix)
        T = len(seq.text_ids)
        bucket = next((b for b in self.prefill_buckets if b >= T + 1), None)
        if bucket is None:
            ids = torch.tensor(seq.text_ids, dtype=torch.long, device=self.device)
            logits = prefill(self.model, g.cache, s - g.start, prefix, ids)[None]  # (1, V)
        else:
            logits = self._staged_prefill(g, s - g.start, prefix, seq.text_ids, bucket)
        row = slice(s, s + 1)
        tok = self._sample(logits, row, self.row_top_k[s] <= self.shape.topk_width)  # (1,)
        # upstream: later tokens see only the generated ids (the start token drops out)
        self.seen[s] = False
        self.seen[s, tok[0]] = True
        self.step[s] = 1
        self.tokens[s] = tok[0]
        seq.position = prefix.length + len(seq.text_ids) + 1
        self.positions[s] = seq.position
        self.active[s] = 1
        return int(tok[0])

    def _staged_prefill(self, g: SlotGroup, local: int, prefix: VoicePrefix, text_ids: list[int], bucket: int) -> Tensor:
        """CUDA prefill: padded run in the staging slot (graph if captured), then copy into the slot. Returns (1, V)."""
        if self._staging_prefix is not prefix:
            prefix.copy_into(self.staging, 0)
            self._staging_prefix = prefix
        T = len(text_ids)
        self.pf_ids[:T].copy_(torch.tensor(text_ids, dtype=torch.long), non_blocking=True)
        self.pf_len.fill_(T)
        graph = self.prefill_graphs.get(bucket)
        if graph is not None:
            graph.replay()
        else:
            self._prefill_body(bucket)
        n = prefix.length + T + 1
        for (k, v), (sk, sv) in zip(g.cache.view(slice(local, local + 1), n), self.staging.view(slice(0, 1), n)):
            k.copy_(sk)
            v.copy_(sv)
        return self.pf_logits

    def _prefill_body(self, bucket: int) -> None:
        """``[text ids | start]`` padded to ``bucket`` rows at positions ``P ..`` of the staging slot;
        writes the start row's logits to ``pf_logits`` (the captured region of a CUDA prefill)."""
        m, P = self.model, self.model.cfg.prefix_len
        idx = torch.arange(bucket, device=self.device)
        is_start = (idx == self.pf_len)[:, None]  # (bucket, 1)
        x = torch.where(is_start, m.speech_emb(self._start_id), m.text_emb(self.pf_ids[:bucket]))
        hidden = m.forward_embeds(x[None].to(self.dtype), (P + idx)[None], self.staging.view(slice(0, 1), P + bucket))
        self.pf_logits.copy_(m.speech_logits(hidden[0].index_select(0, self.pf_len)))

    @torch.inference_mode()
    def capture_prefill_graphs(self) -> None:
        """One CUDA graph per prefill bucket (staging slot only; the slot copy stays outside)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in self.prefill_buckets:
                self._prefill_body(b)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for b in reversed(self.prefill_buckets):
            cg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cg, pool=self._pool):
                self._prefill_body(b)
            self._pool = cg.pool()
            self.prefill_graphs[b] = cg
        torch.cuda.synchronize(self.device)

    def _sample(self, logits: Tensor, rows: slice, fast: bool) -> Tensor:
        args = (logits, self.seen[rows], self.temperature[rows], self.top_k[rows], self.top_p_threshold[rows],
                self.top_p_on[rows], self.penalty[rows])
        scores = process_logits_topk(*args, width=self.shape.topk_width) if fast else process_logits(*args)
        return sample(scores.softmax(dim=-1), self.seed[rows], self.step[rows], self.vhash)

    def _decode_body(self, g: SlotGroup, n: int, kv_len: int, fast: bool = True) -> None:
        """One decode step over rows ``0..n-1`` of group ``g``, entirely on the device (the captured region)."""
        a, b = g.start, g.start + n
        logits = decode_step(self.model, g.cache, n, self.tokens[a:b], self.positions[a:b], kv_len)
        tok = self._sample(logits, slice(a, b), fast)
        self.tokens[a:b] = tok
        self.sampled[a:b] = tok
        self.seen.index_put_((self.rows[a:b], tok), self._true)
        self.positions[a:b] += self.active[a:b]
        self.step[a:b] += 1

    @torch.inference_mode()
    def decode(self, running: list[tuple[int, int]]) -> list[int]:
        """Advance every running slot by one token. ``running``: ``(slot, position)`` of each running
        sequence (position = where its last token is written this step). Returns the sampled ids
        indexed by slot, up to the highest running slot (ignore the others)."""
        per_group: dict[int, list[tuple[int, int]]] = {}
        for slot, pos in running:
            per_group.setdefault(self.groups.index(self.group_of(slot)), []).append((slot, pos))
        for gi, rows in per_group.items():
            g = self.groups[gi]
            n, kv_len = self.decode_key(max(s for s, _ in rows) - g.start + 1, max(p for _, p in rows), g)
            fast = all(self.row_top_k[s] <= self.shape.topk_width for s, _ in rows)
            graph = g.graphs.get((n, kv_len)) if fast else None
            if graph is not None:
                graph.replay()
            else:
                self._decode_body(g, n, kv_len, fast)
        return self.sampled[:max(s for s, _ in running) + 1].tolist()

    # ------------------------------------------------------------------ CUDA graphs (CUDA only)
    @torch.inference_mode()
    def capture_graphs(self, g: SlotGroup) -> None:
        """Capture group ``g``'s decode step (top-k fast path) for every (batch bucket, KV bucket).

        Runs warm-up steps on the group's rows, so it must happen before any of them is in use
        (:meth:`ensure_group` calls it when the group is created); its row state is reset after.
        """
        keys = self.graph_keys(g)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up (allocator, cuBLAS handles, lazy kernels)
            for n, kv_len in keys:
                self._decode_body(g, n, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for n, kv_len in reversed(keys):  # largest first so the pool fits the rest
            cg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cg, pool=self._pool):
                self._decode_body(g, n, kv_len)
            self._pool = cg.pool()
            g.graphs[(n, kv_len)] = cg
        torch.cuda.synchronize(self.device)
        rows = slice(g.start, g.start + g.size)
        for t in (self.tokens, self.positions, self.active, self.step, self.sampled):
            t[rows] = 0
        self.seen[rows] = False
        log.info("captured %d decode CUDA graphs for slots %d..%d (batch %s × kv %s)", len(keys), g.start,
                 g.start + g.size - 1, list(g.batch_sizes), self._kv_buckets())
