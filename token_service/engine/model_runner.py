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
streaming needs anyway; :meth:`ModelRunner.decode_launch` / :meth:`ModelRunner.decode_collect` split
it off (ids copied to a pinned buffer behind an event), so the engine can queue step N+1 before it
reads step N's ids (``EngineConfig.overlap_steps``).

Sampling uses the top-k fast path (``process_logits_topk``: one ``topk`` instead of two full
sorts) whenever every running row of the group has ``top_k <= TOPK_WIDTH`` (the default 1000
does); other settings run the full-sort path eagerly (no graph).

Prefill on CUDA runs ``[text | start]`` of up to ``prefill_rows`` sequences at once, padded to a
length bucket (``PREFILL_BUCKETS``), in *staging* rows that hold the voice prefix, captured as one
CUDA graph per (rows, length) bucket, then copies each staging row's keys/values into its slot. The padding rows sit after the real ones,
so they never influence them (causal mask); their keys/values land at positions the decode steps
overwrite before anything attends to them. Longer texts, and CPU, prefill eagerly in place.

Inactive rows inside ``0 .. B-1`` compute garbage that is ignored; their position does not move
(``positions += active``), so they never index past the cache.

``RunnerShape.compile`` (opt-in) runs the decode step's model and sampler through
``t3.compiled.CompiledDecode`` (``torch.compile``'d segments between attention calls). Each new
group compiles them for every batch bucket in :meth:`ModelRunner.ensure_group`, before the graph
capture's warm-up, so the captured graphs hold the Triton kernels. If compiling (or capturing the
compiled step) fails, the runner logs a warning, records it in ``compile_status`` and goes on
with the eager step; it never fails the engine for it.

``RunnerShape.kernels = "triton"`` computes the logits of batch buckets up to
``RunnerShape.fused_max_batch`` (2) with ``FusedDecode`` (hand-written Triton kernels, ~5 per layer);
larger buckets keep the path above. Those kernels read each row's attended length from
``positions`` on the device, so such a bucket has ONE graph (key ``(n, max_seq_len)``) instead of
one per KV bucket. Without Triton, or when a kernel fails to compile or run at start-up, the runner
logs a warning, records it in ``kernels_status`` and uses the torch step. On Hopper the kernels use
programmatic dependent launch (``kernels_status`` "triton+pdl"; ``FusedDecode.pdl``); if the PDL step
fails its start-up check or graph capture, the runner first retries the Triton step without PDL
("triton (pdl off: <why>)"), then falls back to torch. Those buckets (top-k fast
path, no torch.compile) also sample in ONE kernel, ``t3.triton_sampling.sample_fused`` (the processors,
softmax and draw; ``fused_sampler``), else in ``process_logits_topk`` + ``softmax`` + the one-kernel draw
``t3.triton_sampling.sample_race`` (``fused_draw``; instead of ~40 kernels for ``sample``'s hash, log,
division and argmax). With the one-kernel sampler, the step's bookkeeping (``tokens``, ``sampled``,
``seen``, ``positions += active``, ``step += 1``) runs in that same kernel too
(``t3.triton_sampling.sample_fused_step``; ``fused_sampler_step``, checked with ``fused_sampler``),
launched with programmatic dependent launch only if ``triton_sampling.SAMPLER_PDL`` (off: no gain measured)
and the Triton step's PDL are on (``pdl=fused.pdl_active``: the ladder that turns the step's PDL off turns
the sampler's off with it);
every other path keeps the torch ops. A start-up check (:meth:`ModelRunner._check_fused_draw`) that
fails turns off only the kernel it checked (a warning; the sampler and its step variant go together).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tts_common.cuda_capture import capture_error_mode, exclusive_capture

from ..t3.compiled import COMPILE_MODES, CompiledDecode
from ..t3.config import START_SPEECH
from ..t3.generate import decode_step, prefill
from ..t3.model import KVCache, T3Model, prefill_attention_backends
from ..t3.sampling import (TOPK_WIDTH, SamplingParams, process_logits, process_logits_topk, row_values, sample,
                           seed32, vocab_hash)
from ..t3.voice import VoicePrefix
from .sequence import Sequence

log = logging.getLogger(__name__)

KERNELS = ("torch", "triton")  # decode-step implementations of the small batch buckets
FUSED_CHECK_REL = 0.1  # start-up check of the Triton step against the torch step (relative L2 of the logits)
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
    prefill_rows: int = 4  # sequences prefilled together in one staged run
    compile: bool = False  # decode step through torch.compile'd segments (t3.compiled)
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune-no-cudagraphs
    kernels: str = "torch"  # torch | triton: batch buckets <= fused_max_batch through FusedDecode
    # largest batch bucket of the Triton step (<= triton_decode.MAX_BATCH). Measured on an H100 (logits
    # only, KV 512, bench/tune_triton_decode.py): Triton 0.63 / 1.16 / 2.20 / 3.95 ms at batch 1 / 2 / 4 / 8
    # vs torch 1.27 / 1.29 / 1.31 / 1.38 ms: its GEMV wins only at batch 1 and 2
    fused_max_batch: int = 2
    overlap_depth: int = 1  # decode_launch: steps queued ahead of the one being read (depth + 1 host buffers)


@dataclass
class DecodeHandle:
    """A launched decode step: its ids once read (``ids``), else the pinned buffer + event to read them from."""

    hi: int  # ids of slots 0 .. hi-1
    ids: list[int] | None = None
    buf: Tensor | None = None
    event: "torch.cuda.Event | None" = None


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
        # CUDA: overlap_depth + 1 pinned host buffers (+ events) the launched steps' ids land in, in turn (a ring)
        if shape.overlap_depth < 1:
            raise ValueError(f"overlap_depth must be >= 1, got {shape.overlap_depth}")
        self._host_ids: list[Tensor] | None = None
        self._host_events: list["torch.cuda.Event"] = []
        self._host_turn = 0
        if device.type == "cuda":
            n_bufs = shape.overlap_depth + 1
            self._host_ids = [torch.zeros(n, dtype=torch.long, pin_memory=True) for _ in range(n_bufs)]
            self._host_events = [torch.cuda.Event() for _ in range(n_bufs)]
        self.use_graphs = shape.cuda_graphs and device.type == "cuda"
        self.compiled: CompiledDecode | None = None
        self.compile_status = "off"  # off | on | fallback: <why> (eager step after a failure)
        if shape.compile:
            if shape.compile_mode not in COMPILE_MODES:
                raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {shape.compile_mode!r}")
            try:
                self.compiled = CompiledDecode(model, shape.compile_mode)
                self.compile_status = "on"
            except Exception as e:  # noqa: BLE001 - never fail the engine for the fast path
                self._compile_failed(e, "setting up torch.compile")
        self.fused = None  # t3.triton_decode.FusedDecode when kernels == "triton" and it works
        self.fused_draw = None  # t3.triton_sampling.sample_race when the Triton step is on and it works
        self.fused_sampler = None  # t3.triton_sampling.sample_fused, likewise (the whole sampler, one kernel)
        # t3.triton_sampling.sample_fused_step: that kernel + the step's state updates (used only with fused_sampler)
        self.fused_sampler_step = None
        # torch | triton | triton+pdl | triton (pdl off: <why>) | fallback: <why> (torch step after a failure)
        self.kernels_status = "torch"
        if shape.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {shape.kernels!r}")
        if shape.kernels == "triton":
            try:
                from ..t3.triton_decode import FusedDecode

                self.fused = FusedDecode(model, max_batch=shape.fused_max_batch)
                self.kernels_status = "triton+pdl" if self.fused.pdl_active else "triton"
            except Exception as e:  # noqa: BLE001 - never fail the engine for the fast path
                self._fused_failed(e, "setting up the Triton decode kernels")
        if self.fused is not None:
            try:
                from ..t3.triton_sampling import sample_race

                self.fused_draw = sample_race  # the sampler's draw in one kernel (Triton buckets only)
            except Exception as e:  # noqa: BLE001
                self._fused_draw_failed(e)
            try:
                from ..t3.triton_sampling import MAX_FUSED_V, sample_fused, sample_fused_step

                if V > MAX_FUSED_V:
                    raise ValueError(f"speech vocabulary {V} > MAX_FUSED_V = {MAX_FUSED_V}")
                self.fused_sampler = sample_fused  # the whole sampler in one kernel (Triton buckets only)
                self.fused_sampler_step = sample_fused_step  # ... and the step's bookkeeping in it too
            except Exception as e:  # noqa: BLE001
                self._fused_sampler_failed(e)
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
            top, rows = self.prefill_buckets[-1], shape.prefill_rows
            self.prefill_row_buckets = tuple(b for b in (1, 2, 4, 8, 16) if b < rows) + (rows,)
            self.staging = KVCache(cfg, rows, P + top, device=device, dtype=dtype)
            self._staging_prefix: list[VoicePrefix | None] = [None] * rows
            self.pf_ids = torch.zeros(rows, top, dtype=torch.long, **z)
            self.pf_len = torch.zeros(rows, dtype=torch.long, **z)  # T per row: where the start token goes
            self.pf_logits = torch.zeros(rows, V, dtype=torch.float32, **z)
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
            # compiled segments guard on the cache's tensor kind: plain tensors for every group then;
            # the default (eager step) path keeps the cache exactly as before
            plain = torch.inference_mode(False) if self.compiled is not None else contextlib.nullcontext()
            with plain:
                g.cache = KVCache(self.model.cfg, g.size, self.shape.max_seq_len, device=self.device, dtype=self.dtype)
            if self.compiled is not None:
                self.warm_up_compiled(g)
            if self.fused is not None:
                self.warm_up_fused(g)
            if self.use_graphs:
                try:
                    self.capture_graphs(g)
                except Exception as e:  # noqa: BLE001
                    if self.compiled is None and self.fused is None:
                        raise
                    g.graphs.clear()
                    what = f"capturing the decode step of slots {g.start}.."
                    fused_was_on = self.fused is not None
                    err: BaseException | None = e
                    if fused_was_on and self.fused.pdl_active:  # ladder: Triton without PDL, then torch
                        err = self._capture_without_pdl(g, e, what)
                    if err is not None:
                        if self.fused is not None:
                            self._fused_failed(err, what)
                        elif not fused_was_on:
                            self._compile_failed(err, f"capturing the compiled decode step of slots {g.start}..")
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

    def fused_serves(self, n: int) -> bool:
        """Whether batch bucket ``n`` runs the Triton step (its graph then serves every KV length)."""
        return self.fused is not None and n <= self.fused.max_batch

    def graph_keys(self, group: SlotGroup | None = None) -> list[tuple[int, int]]:
        """Every (batch bucket, KV bucket) a decode of ``group`` can ask for; one CUDA graph each.
        Buckets of the Triton step have one key, ``(n, max_seq_len)``."""
        group = group or self.groups[0]
        return [(n, kv) for n in group.batch_sizes
                for kv in ([self.shape.max_seq_len] if self.fused_serves(n) else self._kv_buckets())]

    def decode_key(self, n_rows: int, max_position: int, group: SlotGroup | None = None) -> tuple[int, int]:
        """The (batch bucket, KV bucket) a decode over ``n_rows`` rows of ``group`` up to ``max_position`` runs."""
        n = self.batch_bucket(n_rows, group)
        return n, self.shape.max_seq_len if self.fused_serves(n) else self.kv_bucket(max_position + 1)

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
        return self.prefill_many([seq], [prefix])[0]

    @torch.inference_mode()
    def prefill_many(self, seqs: list[Sequence], prefixes: list[VoicePrefix]) -> list[int]:
        """Prefill sequences (each into its own slot), sample their first tokens, arm the slots.

        Staged path (CUDA): up to ``prefill_rows`` sequences share one padded run in the staging
        rows. Texts too long for the buckets (and everything on CPU) prefill one by one in place.
        """
        staged, alone = [], []
        for seq, prefix in zip(seqs, prefixes):
            self.ensure_group(self.groups.index(self.group_of(seq.slot)))
            self.activate(seq, prefix)
            fits = bool(self.prefill_buckets) and len(seq.text_ids) + 1 <= self.prefill_buckets[-1]
            (staged if fits else alone).append((seq, prefix))
        logits_of: dict[int, Tensor] = {}
        rows = self.shape.prefill_rows
        for i in range(0, len(staged), rows):
            chunk = staged[i:i + rows]
            logits = self._staged_prefill(chunk).clone()  # the next chunk reuses pf_logits
            for r, (seq, _) in enumerate(chunk):
                logits_of[seq.seq_id] = logits[r:r + 1]
        for seq, prefix in alone:
            g = self.group_of(seq.slot)
            ids = torch.tensor(seq.text_ids, dtype=torch.long, device=self.device)
            with prefill_attention_backends(self.device):  # no per-length cuDNN plan builds
                logits_of[seq.seq_id] = prefill(self.model, g.cache, seq.slot - g.start, prefix, ids)[None]
        if not seqs:
            return []
        # first tokens of all of them in one batched sampling pass (rows gathered by slot)
        idx = torch.tensor([q.slot for q in seqs], dtype=torch.long, device=self.device)
        logits = torch.cat([logits_of[q.seq_id] for q in seqs])  # (n, V)
        fast = all(self.row_top_k[q.slot] <= self.shape.topk_width for q in seqs)
        args = (logits, self.seen[idx], self.temperature[idx], self.top_k[idx], self.top_p_threshold[idx],
                self.top_p_on[idx], self.penalty[idx])
        scores = process_logits_topk(*args, width=self.shape.topk_width) if fast else process_logits(*args)
        tok = sample(scores.softmax(dim=-1), self.seed[idx], self.step[idx], self.vhash)  # (n,)
        for seq, prefix in zip(seqs, prefixes):
            seq.position = prefix.length + len(seq.text_ids) + 1
        # upstream: later tokens see only the generated ids (the start token drops out)
        self.seen[idx] = False
        self.seen[idx, tok] = True
        self.step[idx] = 1
        self.tokens[idx] = tok
        self.positions[idx] = torch.tensor([q.position for q in seqs], dtype=torch.long, device=self.device)
        self.active[idx] = 1
        return tok.tolist()

    def _staged_prefill(self, chunk: list[tuple[Sequence, VoicePrefix]]) -> Tensor:
        """Padded run of ``chunk`` in staging rows ``0..len-1`` (graph if captured), then copy each
        row into its sequence's slot. Returns the start rows' logits ``(n_rows_bucket, V)``."""
        n = len(chunk)
        nb = next(b for b in self.prefill_row_buckets if b >= n)
        bucket = next(b for b in self.prefill_buckets if b >= max(len(q.text_ids) for q, _ in chunk) + 1)
        lens = [len(q.text_ids) for q, _ in chunk] + [0] * (nb - n)
        ids = torch.zeros(nb, bucket, dtype=torch.long)
        for r, (seq, prefix) in enumerate(chunk):
            ids[r, :len(seq.text_ids)] = torch.tensor(seq.text_ids, dtype=torch.long)
            if self._staging_prefix[r] is not prefix:
                prefix.copy_into(self.staging, r)
                self._staging_prefix[r] = prefix
        self.pf_ids[:nb, :bucket].copy_(ids, non_blocking=True)
        self.pf_len[:nb].copy_(torch.tensor(lens, dtype=torch.long), non_blocking=True)
        graph = self.prefill_graphs.get((nb, bucket))
        if graph is not None:
            graph.replay()
        else:
            self._prefill_body(nb, bucket)
        for r, (seq, prefix) in enumerate(chunk):
            g, m = self.group_of(seq.slot), prefix.length + len(seq.text_ids) + 1
            local = seq.slot - g.start
            dst = [t for kv in g.cache.view(slice(local, local + 1), m) for t in kv]
            torch._foreach_copy_(dst, [t for kv in self.staging.view(slice(r, r + 1), m) for t in kv])
        return self.pf_logits[:nb]

    def _prefill_body(self, n_rows: int, bucket: int) -> None:
        """Rows ``[text ids | start]`` padded to ``bucket`` at positions ``P ..`` of staging rows
        ``0..n_rows-1``; writes each row's start-token logits to ``pf_logits`` (the captured region)."""
        m, P = self.model, self.model.cfg.prefix_len
        idx = torch.arange(bucket, device=self.device)
        lens = self.pf_len[:n_rows]
        is_start = (idx[None, :] == lens[:, None])[..., None]  # (rows, bucket, 1)
        x = torch.where(is_start, m.speech_emb(self._start_id), m.text_emb(self.pf_ids[:n_rows, :bucket]))
        positions = (P + idx)[None].expand(n_rows, bucket)
        hidden = m.forward_embeds(x.to(self.dtype), positions, self.staging.view(slice(0, n_rows), P + bucket))
        last = hidden.gather(1, lens[:, None, None].expand(n_rows, 1, hidden.shape[-1]))[:, 0]  # (rows, C)
        self.pf_logits[:n_rows].copy_(m.speech_logits(last))

    @exclusive_capture  # co-located mode: one capture at a time per process (tts_common/cuda_capture.py)
    @torch.inference_mode()
    def capture_prefill_graphs(self) -> None:
        """One CUDA graph per (staging rows, length bucket); the slot copies stay outside."""
        keys = [(nb, b) for nb in self.prefill_row_buckets for b in self.prefill_buckets]
        self.pf_len.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for nb, b in keys:
                self._prefill_body(nb, b)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for nb, b in reversed(keys):
            cg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cg, pool=self._pool, capture_error_mode=capture_error_mode()):
                self._prefill_body(nb, b)
            self._pool = cg.pool()
            self.prefill_graphs[(nb, b)] = cg
        torch.cuda.synchronize(self.device)

    def _sample(self, logits: Tensor, rows: slice, fast: bool, triton_draw: bool = False) -> Tensor:
        args = (logits, self.seen[rows], self.temperature[rows], self.top_k[rows], self.top_p_threshold[rows],
                self.top_p_on[rows], self.penalty[rows])
        if triton_draw and self.fused_sampler is not None:  # one kernel: processors, softmax and draw
            return self.fused_sampler(logits.float(), *args[1:], self.seed[rows], self.step[rows], self.vhash)
        scores = process_logits_topk(*args, width=self.shape.topk_width) if fast else process_logits(*args)
        draw = self.fused_draw if triton_draw and self.fused_draw is not None else sample
        return draw(scores.softmax(dim=-1), self.seed[rows], self.step[rows], self.vhash)

    def _decode_body(self, g: SlotGroup, n: int, kv_len: int, fast: bool = True) -> None:
        """One decode step over rows ``0..n-1`` of group ``g``, entirely on the device (the captured region)."""
        a, b = g.start, g.start + n
        cd = self.compiled
        if self.fused_serves(n):  # kv_len is irrelevant here: each row attends up to its own position
            logits = self.fused.logits(g.cache, n, self.tokens[a:b], self.positions[a:b])
        elif cd is None:
            logits = decode_step(self.model, g.cache, n, self.tokens[a:b], self.positions[a:b], kv_len)
        else:
            logits = cd.logits(g.cache, n, self.tokens[a:b], self.positions[a:b], kv_len)
        if (cd is None and fast and self.fused_serves(n) and self.fused_sampler is not None
                and self.fused_sampler_step is not None):
            # ONE kernel: processors, softmax, draw AND the bookkeeping below (tokens, sampled, seen, positions, step)
            self.fused_sampler_step(logits.float(), self.seen[a:b], self.temperature[a:b], self.top_k[a:b],
                                    self.top_p_threshold[a:b], self.top_p_on[a:b], self.penalty[a:b], self.seed[a:b],
                                    self.step[a:b], self.vhash, self.tokens[a:b], self.sampled[a:b],
                                    self.positions[a:b], self.active[a:b], pdl=self.fused.pdl_active)
            return
        if cd is None:
            tok = self._sample(logits, slice(a, b), fast, triton_draw=fast and self.fused_serves(n))
        else:
            if fast:
                tok = cd.sample(logits, self.seen[a:b], self.temperature[a:b], self.top_k[a:b],
                                self.top_p_threshold[a:b], self.top_p_on[a:b], self.penalty[a:b], self.seed[a:b],
                                self.step[a:b], self.vhash, self.shape.topk_width)
            else:
                tok = self._sample(logits, slice(a, b), False)
        self._advance(tok, self.tokens[a:b], self.sampled[a:b], self.seen[a:b], self.positions[a:b],
                      self.active[a:b], self.step[a:b])

    def _advance(self, tok: Tensor, tokens: Tensor, sampled: Tensor, seen: Tensor, positions: Tensor,
                 active: Tensor, step: Tensor) -> None:
        """The step's torch bookkeeping, in place, for rows sampled ``tok (n,)``: each row's next input
        and read-back id, its ``seen`` mark, its position (active rows only) and its step. (The one-kernel
        sampler's step variant does the same in its kernel; its start-up check compares against this.)"""
        tokens.copy_(tok)
        sampled.copy_(tok)
        seen.index_put_((self.rows[:tok.shape[0]], tok), self._true)
        positions += active
        step += 1

    @torch.inference_mode()
    def decode(self, running: list[tuple[int, int]]) -> list[int]:
        """Advance every running slot by one token. ``running``: ``(slot, position)`` of each running
        sequence (position = where its last token is written this step). Returns the sampled ids
        indexed by slot, up to the highest running slot (ignore the others). The serial path: one
        synchronous read-back (what the H100 measurements ran); :meth:`decode_launch` is the overlapped one."""
        self._launch_body(running)
        return self.sampled[:max(s for s, _ in running) + 1].tolist()

    @torch.inference_mode()
    def decode_launch(self, running: list[tuple[int, int]]) -> DecodeHandle:
        """Queue one decode step (as :meth:`decode`) without waiting for it; :meth:`decode_collect`
        returns its ids. On CUDA the step's ``sampled[:hi]`` is copied into the next of
        ``overlap_depth + 1`` pinned host buffers (``non_blocking``, a ring) and an event recorded, so
        further steps can be launched before this one's ids are read; at most ``overlap_depth + 1``
        handles may be outstanding (collected oldest first; the ring reuses the oldest's buffer). On
        CPU the step runs eagerly and the handle holds the list."""
        self._launch_body(running)
        hi = max(s for s, _ in running) + 1
        if self._host_ids is None:
            return DecodeHandle(hi, ids=self.sampled[:hi].tolist())
        self._host_turn = (self._host_turn + 1) % len(self._host_ids)
        buf, event = self._host_ids[self._host_turn], self._host_events[self._host_turn]
        buf[:hi].copy_(self.sampled[:hi], non_blocking=True)
        event.record()
        return DecodeHandle(hi, buf=buf, event=event)

    def decode_collect(self, handle: DecodeHandle) -> list[int]:
        """The sampled ids of a launched step, indexed by slot up to its highest running slot (waits for it)."""
        if handle.ids is None:
            handle.event.synchronize()
            handle.ids = handle.buf[:handle.hi].tolist()
        return handle.ids

    def _launch_body(self, running: list[tuple[int, int]]) -> None:
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

    # ------------------------------------------------------------------ torch.compile (opt-in)
    def _compile_failed(self, err: BaseException, what: str) -> None:
        """Give up on the compiled step: warn, record why, run the eager step from now on."""
        self.compiled = None
        self.compile_status = f"fallback: {what} failed: {type(err).__name__}: {str(err)[:300]}"
        log.warning("T3 torch.compile disabled, decoding eagerly (%s)", self.compile_status, exc_info=err)

    @torch.inference_mode()
    def warm_up_compiled(self, g: SlotGroup) -> None:
        """Compile the decode segments for every batch bucket of ``g`` (one step each over the group's
        still idle rows, then their state is reset). Falls back to eager on any failure."""
        import time

        t0 = time.perf_counter()
        kv_len = self._kv_buckets()[0]  # the segments do not depend on the KV bucket
        try:
            for n in g.batch_sizes:
                self._decode_body(g, n, kv_len)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001
            self._compile_failed(e, f"compiling the decode step for slots {g.start}..{g.start + g.size - 1}")
        finally:
            self._reset_rows(g)
        if self.compiled is not None:
            log.info("compiled T3 decode step for slots %d..%d (batch %s) in %.1f s", g.start, g.start + g.size - 1,
                     list(g.batch_sizes), time.perf_counter() - t0)

    # ------------------------------------------------------------------ Triton decode kernels (opt-in)
    def _fused_failed(self, err: BaseException, what: str) -> None:
        """Give up on the Triton step: warn, record why, run the torch step from now on."""
        self.fused = None
        self.kernels_status = f"fallback: {what} failed: {type(err).__name__}: {str(err)[:300]}"
        log.warning("T3 Triton decode kernels disabled, using the torch step (%s)", self.kernels_status, exc_info=err)

    def _fused_pdl_off(self, err: BaseException, what: str) -> None:
        """First rung of the fallback ladder: keep the Triton step, without programmatic dependent launch."""
        self.fused.pdl = False
        self.kernels_status = f"triton (pdl off: {what} failed: {type(err).__name__}: {str(err)[:300]})"
        log.warning("T3 Triton decode kernels: programmatic dependent launch disabled, retrying without it (%s)",
                    self.kernels_status, exc_info=err)

    def _capture_without_pdl(self, g: SlotGroup, err: BaseException, what: str) -> BaseException | None:
        """Capturing the PDL step failed with ``err``: turn PDL off, re-check the Triton step without
        it (:meth:`warm_up_fused`, which may fall back to torch itself) and capture again. Returns
        ``None`` when the graphs are captured, else the error to fall back to torch with."""
        self._fused_pdl_off(err, what)
        self.warm_up_fused(g)
        if self.fused is None:  # the non-PDL step failed its check: warm_up_fused fell back already
            return err
        try:
            self.capture_graphs(g)
            return None
        except Exception as e2:  # noqa: BLE001
            g.graphs.clear()
            return e2

    @torch.inference_mode()
    def warm_up_fused(self, g: SlotGroup) -> None:
        """Compile (and check) the Triton kernels for every batch bucket of ``g`` it serves: one step
        each over the group's still idle rows, then their state is reset. Falls back on any failure:
        an error, non-finite logits, or logits of the first bucket further than ``FUSED_CHECK_REL``
        (relative L2) from the torch step's (a miscompiled kernel, not rounding: bf16 is ~1e-2). That
        check attends to random keys/values at positions ``0 .. kv_bucket - 2`` of the idle rows (the
        cache loop, not only the new token); prefill and decode overwrite them before any use.
        With programmatic dependent launch on, a failure first turns it off and checks again; only a
        failure without it falls back to the torch step."""
        what = f"running the Triton decode step for slots {g.start}..{g.start + g.size - 1}"
        try:
            self._check_fused_step(g)
        except Exception as e:  # noqa: BLE001
            if self.fused.pdl_active:
                self._fused_pdl_off(e, what)
                self._reset_rows(g)
                try:
                    self._check_fused_step(g)
                except Exception as e2:  # noqa: BLE001
                    self._fused_failed(e2, what)
            else:
                self._fused_failed(e, what)
        finally:
            self._reset_rows(g)
        if self.fused is not None and (self.fused_draw is not None or self.fused_sampler is not None):
            self._check_fused_draw(g)

    def _check_fused_step(self, g: SlotGroup) -> None:
        """One Triton step per batch bucket of ``g`` it serves (see :meth:`warm_up_fused`); raises on a failure."""
        a, kv_len = g.start, self._kv_buckets()[0]
        for n in g.batch_sizes:
            if self.fused_serves(n):
                tokens, positions = self.tokens[a:a + n], self.positions[a:a + n]
                want = None
                if n == g.batch_sizes[0]:
                    for k, v in zip(g.cache.k, g.cache.v):
                        k[:n, :, :kv_len - 1].normal_()
                        v[:n, :, :kv_len - 1].normal_()
                    positions.fill_(kv_len - 1)
                    want = decode_step(self.model, g.cache, n, tokens, positions, kv_len)
                logits = self.fused.logits(g.cache, n, tokens, positions)
                if not bool(torch.isfinite(logits).all()):
                    raise RuntimeError(f"non-finite logits from the Triton step at batch {n}")
                if want is not None:
                    rel = float((logits - want).norm() / want.norm().clamp_min(1e-12))
                    if rel > FUSED_CHECK_REL:
                        raise RuntimeError(f"Triton logits differ from the torch step's at batch {n}: "
                                           f"relative L2 error {rel:.3g} > {FUSED_CHECK_REL}")

    def _fused_draw_failed(self, err: BaseException) -> None:
        self.fused_draw = None
        log.warning("T3 Triton sampling draw disabled, using the torch draw (%s: %s)", type(err).__name__,
                    str(err)[:300], exc_info=err)

    def _fused_sampler_failed(self, err: BaseException) -> None:
        self.fused_sampler = self.fused_sampler_step = None
        log.warning("T3 one-kernel Triton sampler disabled, using the torch processors + softmax + draw (%s: %s)",
                    type(err).__name__, str(err)[:300], exc_info=err)

    @torch.inference_mode()
    def _check_fused_draw(self, g: SlotGroup) -> None:
        """Compile the Triton sampling kernels for every batch bucket of ``g`` they serve and check them;
        a failure turns off only the kernel that failed (a warning).

        ``fused_draw`` against ``sample`` on flat rows (equal probabilities: the draw is then the id of the
        largest uniform, which does not depend on the log's last bit, so the ids must be equal, hash bits
        included). ``fused_sampler`` against ``sample(process_logits(...).softmax(-1))`` on fixed random
        logits with upstream's default settings and some seen ids: equal ids required (the kernel may
        differ only at top-p ties and threshold rounding and on near-ties of the draw, which these rows,
        drawn once from a fixed generator, are not expected to hit)."""
        V = self.model.cfg.speech_vocab_size
        if self.fused_draw is not None:
            try:
                for n in g.batch_sizes:
                    if self.fused_serves(n):
                        seed = torch.arange(n, dtype=torch.long, device=self.device) * 0x9E3779B1 % (1 << 32)
                        step = torch.arange(n, dtype=torch.long, device=self.device) + 1000
                        probs = torch.full((n, V), 1.0 / V, device=self.device)
                        got = self.fused_draw(probs, seed, step, self.vhash)
                        want = sample(probs, seed, step, self.vhash)
                        if not torch.equal(got, want):
                            raise RuntimeError(f"Triton draw {got.tolist()} != torch draw {want.tolist()} at batch {n}")
            except Exception as e:  # noqa: BLE001 - never fail the engine for the fast path
                self._fused_draw_failed(e)
        if self.fused_sampler is not None:
            try:
                self._check_fused_sampler(g)
            except Exception as e:  # noqa: BLE001 - never fail the engine for the fast path
                self._fused_sampler_failed(e)

    def _check_fused_sampler(self, g: SlotGroup) -> None:
        """``fused_sampler`` against the torch sampler per batch bucket of ``g`` it serves, and (if on)
        ``fused_sampler_step`` against the torch sampler + :meth:`_decode_body`'s torch bookkeeping (on copies
        of the state, mixed active rows); raises on a mismatch."""
        V = self.model.cfg.speech_vocab_size
        gen = torch.Generator().manual_seed(6)
        p = row_values(SamplingParams(), V)
        for n in g.batch_sizes:
            if self.fused_serves(n):
                logits = (torch.randn(n, V, generator=gen) * 3).to(self.device)
                seen = (torch.rand(n, V, generator=gen) < 0.02).to(self.device)
                rows = [torch.full((n,), p[k], dtype=dt, device=self.device) for k, dt in
                        (("temperature", torch.float32), ("top_k", torch.long), ("top_p_threshold", torch.float32),
                         ("top_p_on", torch.bool), ("penalty", torch.float32))]
                seed = torch.randint(0, 1 << 32, (n,), generator=gen).to(self.device)
                step = torch.randint(0, 1000, (n,), generator=gen).to(self.device)
                got = self.fused_sampler(logits, seen, *rows, seed, step, self.vhash)
                want = sample(process_logits(logits, seen, *rows).softmax(dim=-1), seed, step, self.vhash)
                if not torch.equal(got, want):
                    raise RuntimeError(f"Triton sampler {got.tolist()} != torch sampler {want.tolist()} at batch {n}")
                if self.fused_sampler_step is not None:
                    self._check_fused_sampler_step(logits, seen, rows, seed, step, want, gen)

    def _check_fused_sampler_step(self, logits: Tensor, seen: Tensor, rows: list[Tensor], seed: Tensor, step: Tensor,
                                  ids: Tensor, gen: torch.Generator) -> None:
        """``fused_sampler_step`` on copies of ``seen`` / ``step`` and fresh row state must draw ``ids`` (the
        torch sampler's) and leave tokens / sampled / seen / positions / step as the torch bookkeeping does."""
        n, dev = logits.shape[0], self.device
        positions = torch.randint(0, self.shape.max_seq_len - 1, (n,), generator=gen).to(dev)
        active = (torch.arange(n) % 2 == 0).long().to(dev)  # row 0 active, row 1 not, ...
        got = dict(tokens=torch.full((n,), -1, dtype=torch.long, device=dev),
                   sampled=torch.full((n,), -2, dtype=torch.long, device=dev),
                   seen=seen.clone(), positions=positions.clone(), step=step.clone())
        # launched as the decode step launches it (programmatic dependent launch with the step's PDL)
        self.fused_sampler_step(logits, got["seen"], *rows, seed, got["step"], self.vhash, got["tokens"],
                                got["sampled"], got["positions"], active, pdl=self.fused.pdl_active)
        want = dict(tokens=torch.empty_like(ids), sampled=torch.empty_like(ids), seen=seen.clone(),
                    positions=positions.clone(), step=step.clone())
        self._advance(ids, want["tokens"], want["sampled"], want["seen"], want["positions"], active, want["step"])
        for k, w in want.items():
            if k == "seen":  # a stored True must be the byte 1 (bool storage)
                bad = (got[k].view(torch.uint8) != w.view(torch.uint8)).nonzero()
                if len(bad):
                    raise RuntimeError(f"Triton sampler step: seen differs from the torch bookkeeping at (row, id) "
                                       f"{bad[:4].tolist()} at batch {n}")
            elif not torch.equal(got[k], w):
                raise RuntimeError(f"Triton sampler step: {k} {got[k].tolist()} != torch bookkeeping {w.tolist()} "
                                   f"at batch {n}")

    def _reset_rows(self, g: SlotGroup) -> None:
        rows = slice(g.start, g.start + g.size)
        for t in (self.tokens, self.positions, self.active, self.step, self.sampled):
            t[rows] = 0
        self.seen[rows] = False

    # ------------------------------------------------------------------ CUDA graphs (CUDA only)
    @exclusive_capture
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
            with torch.cuda.graph(cg, pool=self._pool, capture_error_mode=capture_error_mode()):
                self._decode_body(g, n, kv_len)
            self._pool = cg.pool()
            g.graphs[(n, kv_len)] = cg
        torch.cuda.synchronize(self.device)
        self._reset_rows(g)
        log.info("captured %d decode CUDA graphs for slots %d..%d (batch %s × kv %s)", len(keys), g.start,
                 g.start + g.size - 1, list(g.batch_sizes), self._kv_buckets())
