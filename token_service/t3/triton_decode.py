"""The decode step (T = 1) as hand-written Triton kernels, ~5 per layer (opt-in; issue 6).

The eager batch-1 step is ~400 small kernels (bench/NOTES.md run 4); most of its time is launch
gaps and cuBLAS ``M = 1`` GEMVs far from the memory bandwidth. Here each layer is five kernels
(``B`` rows <= :data:`MAX_BATCH`, ``C`` width, ``H`` heads, ``D = C / H``, ``S`` = :data:`KV_SPLITS`):

1. ``ln_1`` + ``c_attn`` (+ bias): ``x (B, C)`` fp32 -> ``qkv (B, 3C)`` weight dtype.
2. attention of the one new token per row, fused with the K/V cache write, grid ``(B, H, S)``:
   split ``s`` of row ``b`` attends to its share of cache positions ``< positions[b]`` with an
   online softmax; split 0 also takes the new key/value from registers and writes them into the
   cache at ``positions[b]``. Each split leaves a partial ``(max, sum, acc (D,))`` in fp32.
3. ``attn.c_proj`` + bias + residual, whose prologue merges the ``S`` partials of each head into
   ``y (B, C)`` (so the split needs no kernel of its own): ``x += y @ W + b``.
4. ``ln_2`` + ``c_fc`` + bias + tanh-GELU -> ``h (B, 4C)`` weight dtype.
5. ``mlp.c_proj`` + bias + residual: ``x += h @ W + b``.

plus one embedding kernel before the layers (``speech_emb[token] + wpe[position]``) and one
``ln_f`` + ``speech_head`` GEMV after them (fp32 logits ``(B, V)``): ``5·n_layer + 2`` kernels
(122 for Turbo); with :data:`FUSE_EMBED` the embedding is built in the first ``ln_1`` + ``c_attn``
GEMV's prologue instead (its program 0 stores it into the residual stream): ``5·n_layer + 1``. The residual stream ``x`` stays fp32 throughout; activations handed to a matrix
product are rounded to the weight dtype first (as the eager bf16 step does), every product and
softmax accumulates in fp32. The cache loop bound comes from ``positions`` on the device, so one
CUDA graph per batch size serves every KV length.

Weights: each GEMV reads ``BLOCK_N`` whole contiguous rows of an "out-major" ``(N, K)`` matrix per
program. GPT-2's ``Conv1D.weight`` is ``(in, out)``; :func:`relayout_conv1d` re-stores it once as
``(out, in)`` contiguous and makes the parameter a transposed *view* of that, so the torch path
(prefill, large batches, readers of ``state_dict``) sees the same ``(in, out)`` tensor (cuBLAS reads
the transposed view directly) and no weight is stored twice. ``speech_head`` (``nn.Linear``) is
already ``(V, C)``.

All kernels take the weights' dtype (bf16/fp16 on GPU, fp32 on CPU under ``TRITON_INTERPRET=1``,
which is how the tests run them).

Programmatic dependent launch (PDL; Hopper sm_90+, :data:`PDL`): the step's kernels are launched with
``launch_pdl=True``, so kernel ``N + 1`` may start (get its SMs, compute addresses, load weights)
while kernel ``N`` is still finishing. That is safe only because of these rules, which every kernel
here keeps when its ``PDL`` constexpr is on:

* Before ``gdc_wait()`` (``griddepcontrol.wait``) a program reads only memory that no kernel ever
  writes: the weights and biases (a GEMV loads its first weight tile and its bias there, see
  :data:`GEMV_PREFETCH`), never a weight row whose address depends on ``tokens``/``positions``
  (the embedding rows, read after the wait by the embedding kernel or the PRO_EMBED_LN prologue). ``tokens``/``positions`` (written by the previous step's sampler kernel or
  torch ops, or host copies), the residual stream, ``qkv``, the partials and the K/V caches are read after it.
* Every store comes after the wait: kernel ``N`` may still be READING what ``N + 1`` writes (the
  out-projections update ``x`` in place while the previous kernel may read it; the attention of
  layer ``i`` writes ``cache.k[i]`` ...), a write-after-read hazard the wait removes.
* EVERY program executes the wait, unconditionally and before it can exit. ``gdc_wait`` only waits
  for the immediately preceding kernel (its completion and memory flush), yet kernel ``N + 1`` also
  reads outputs of ``N - 1``, ``N - 2`` ... (``x`` from two kernels back, ``qkv`` read by the
  out-projection's merge via the attention partials, caches from earlier steps). That is safe by
  induction: a kernel completes only when all its programs have exited, each program exits only after
  its wait returned, i.e. after the previous kernel completed; so "``N`` complete" implies "every
  earlier kernel complete". A program that skipped the wait would break the chain.
* ``gdc_launch_dependents()`` (:data:`PDL_TRIGGER`) only lets the NEXT kernel be scheduled early;
  it does not release any memory ordering (the next kernel's wait still waits for this one's full
  completion), so where it sits is a performance knob, never a correctness one.

The torch sampler and updates after the logits are launched without the attribute and serialise as
usual; the one-kernel sampler that also updates ``tokens``/``positions`` (``triton_sampling.sample_fused_step``)
is launched with it when ``triton_sampling.SAMPLER_PDL`` and the step's PDL are on: every one of its
programs waits before any load or store, and it never triggers (the op after it is a plain launch). With ``PDL`` off, under the interpreter
(``griddepcontrol`` is inline PTX) or below sm_90 no gdc instruction is emitted and ``launch_pdl`` is
not passed: the plain stream-ordered path. CUDA graphs (``torch.cuda.graph``) capture the launches as
programmatic edges (CUDA >= 12.3); the engine checks capture at start-up and falls back (no PDL, then
the torch step; ``ModelRunner.ensure_group``).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

try:  # Triton is optional: the engine falls back to the torch step without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None
try:  # griddepcontrol wrappers (Triton >= 3.3); without them no PDL (pdl_supported)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None

from .model import KVCache, T3Model

# Block sizes. Read at every launch, so they can be changed at run time to tune them
# (bench/profile_decode.py --triton-set NAME=VALUE); first guesses for an H100, not yet measured.
MAX_BATCH = 8  # largest batch bucket the fused step serves (register tiles scale with it)
KV_SPLITS = 8  # attention programs per (row, head), a power of two: B=1 x 16 heads x 8 = 128 ~ one per SM
# Attention tiles. H100, logits graph replay at batch 1 (bench/NOTES.md runs 56-58), KV 450 / 512 / 768 / 1024:
# 64-position tiles, shares rounded to whole tiles, 4 warps (the old defaults): 0.567 / 0.567 / 0.614-0.616 /
# 0.620 ms (a second tile per split once positions pass 512); 128-position tiles, balanced shares, 8 warps:
# - / 0.577 / 0.579 / 0.587; the same with 64-position tiles for shares <= 64: 0.565 / - / 0.577 / -.
# Whole engine, 300-token utterances (positions ~400-700), overlapped: 1474 -> 1533 tokens/s (run 58).
BLOCK_L = 128  # cache positions per attention loop iteration, a power of two (128 x D=64 bf16 keys: 16 KB)
# attention splits: True = each split takes cdiv(positions, KV_SPLITS) positions (all splits busy, one loop
# iteration while positions <= KV_SPLITS x BLOCK_L); False = shares rounded up to whole BLOCK_L tiles (with
# 64-position tiles at 768 positions: 6 splits walk two tiles, 2 idle)
ATTN_BALANCED = True
# a split whose share is at most this many positions reads it as one tile of this size instead of BLOCK_L
# (0 = off; only used when smaller than BLOCK_L): small tiles for short caches, large ones for long
ATTN_SMALL_BLOCK = 64
MAX_BLOCK_N = 16  # most weight rows per GEMV program
MIN_PROGRAMS = 264  # GEMV programs wanted (2 per H100 SM): BLOCK_N halves until cdiv(N, BLOCK_N) reaches it
# the out-projection GEMV re-merges all S attention partials of its rows in every program
# (S x C x 4 bytes = 32 KB from L2 each for Turbo): fewer, wider programs there
MERGE_MIN_PROGRAMS = 128
# elements of the (rows x BLOCK_N x BLOCK_K) product per GEMV loop iteration: 32 fp32 values per thread
# at 4 warps; at batch 1 a (BLOCK_N, BLOCK_K) bf16 weight tile of 8 KB in flight per program
TILE_ELEMS = 8192
GEMV_WARPS = 8  # H100, batch-1 logits: 0.679 ms at 4 warps / 4096 elements, 0.631 at 8 / 8192 (tune_triton_decode.py)
ATTN_WARPS = 8  # with 128-position tiles (4: 0.589 vs 0.579 ms at KV 768)
MAX_LN_WIDTH = 4096  # LayerNorm prologue holds B x K fp32 row values in registers (8 x 4096 / 128 threads)
# Programmatic dependent launch (module docstring). H100 (bench/NOTES.md run 48, logits graph replay, KV 512):
# batch 1: no PDL 0.626 ms; PDL "end" 0.561 without the prefetch, 0.636 with it; "start" + prefetch 0.597;
# "none" + prefetch 0.664; batch 2: 1.002 no PDL, 0.938 "end" without prefetch, 0.892 "start" + prefetch.
PDL = True  # master switch (effective only on CUDA sm_90+, never under the interpreter; FusedDecode.pdl)
# where a program calls griddepcontrol.launch_dependents (lets the next kernel be scheduled):
# "end" after the GEMV / attention main loop, before the epilogue; "start" right after the wait;
# "none" never (implicit when each program exits)
PDL_TRIGGER = "end"
PDL_TRIGGERS = {"none": 0, "start": 1, "end": 2}
# GEMV: load the next weight tile before the current tile's math (the first one before the wait,
# the bias too); False: each tile loaded in its own iteration, after the wait (the pre-PDL loop)
GEMV_PREFETCH = False  # H100: costs 0.06-0.08 ms at batch 1 (registers: fewer programs per SM), helps batch 2
# the embedding (speech_emb[token] + wpe[position]) built in the first layer's ln_1 + c_attn GEMV prologue
# (PRO_EMBED_LN; program 0 also stores the rows into the residual stream x) instead of its own kernel:
# one launch fewer per step (5·n_layer + 1). Same fp32 sums, same LayerNorm: bit-identical logits.
# H100 (bench/NOTES.md run 52, the runner's whole step at batch 1 / 2): 0.5909 / 0.9737 ms off, 0.5905 /
# 0.9726 on: no measurable gain (with PDL the embedding kernel's launch was already hidden), so off.
FUSE_EMBED = False

# the interpreter runs programs one after the other: fewer, larger programs are much faster there
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if _INTERPRET:
    MAX_BLOCK_N, MIN_PROGRAMS, MERGE_MIN_PROGRAMS, TILE_ELEMS = 256, 1, 1, 1 << 16


def _interpreter_numpy_fix() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into an ``int`` with ``int(ndarray)``, which
    NumPy >= 2.4 refuses for 1-element 1-d arrays (it breaks ``range(0, K, ...)`` on a runtime
    ``K``). Re-patch ``__index__`` to read the one element; interpreter (tests) only, no effect on CUDA."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_numpy_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._numpy_fix = True
    interpreter._patch_lang_tensor = patched


if _INTERPRET and triton is not None:
    _interpreter_numpy_fix()

# GEMV prologues: plain input, LayerNorm, merge attention partials, embedding + LayerNorm (FUSE_EMBED)
PRO_NONE, PRO_LN, PRO_MERGE, PRO_EMBED_LN = 0, 1, 2, 3

GPT2_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


if triton is not None:

    @triton.jit
    def _tanh(u):
        # tanh without libdevice (runs under the interpreter too): 1 - 2 / (e^{2u} + 1), exact at +-inf
        return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)

    @triton.jit
    def _embed_kernel(tok_ptr, pos_ptr, emb_ptr, wpe_ptr, x_ptr, C, BLOCK_C: tl.constexpr,
                      PDL: tl.constexpr, TRIGGER: tl.constexpr):
        """x[b] = emb[tok[b]] + wpe[pos[b]] (fp32). Grid (B,). PDL: everything after the wait (the
        rows to read depend on ``tokens``/``positions``, written before the step)."""
        b = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        cm = c < C
        if PDL:
            gdc_wait()
            if TRIGGER == 1:
                gdc_launch_dependents()
        t = tl.load(tok_ptr + b)
        p = tl.load(pos_ptr + b)
        e = tl.load(emb_ptr + t * C + c, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(wpe_ptr + p * C + c, mask=cm, other=0.0).to(tl.float32)
        if PDL:
            if TRIGGER == 2:
                gdc_launch_dependents()
        tl.store(x_ptr + b * C + c, e + w, mask=cm)

    @triton.jit
    def _gemv_kernel(x_ptr, lnw_ptr, lnb_ptr, pm_ptr, pl_ptr, pacc_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
                     tok_ptr, pos_ptr, emb_ptr, wpe_ptr, B, N, K, eps,
                     BP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PROLOGUE: tl.constexpr,
                     GELU: tl.constexpr, RESIDUAL: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                     BLOCK_ROW: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr, PREFETCH: tl.constexpr):
        """out[b, n] = epilogue(sum_k a[b, k] * w[n, k] + bias[n]) for rows b < B, columns of this program.

        ``a`` is the prologue's input, rounded to the weight dtype: ``x (B, K)`` as is (PRO_NONE), its
        LayerNorm with ``lnw/lnb (K,)`` (PRO_LN; each program recomputes the row statistics), or the
        merge of the attention partials ``pm/pl (B, K/HEAD_DIM, SPLITS)``, ``pacc (B, K/HEAD_DIM, SPLITS,
        HEAD_DIM)`` (PRO_MERGE). ``w (N, K)`` contiguous; epilogue: tanh-GELU (GELU), ``+ res[b, n]``
        fp32 (RESIDUAL; ``res`` may be ``out``). ``BLOCK_ROW >= K`` (PRO_LN): the statistics come from
        one load of the whole rows (one L2 round trip before the weight loop). Grid ``(cdiv(N, BLOCK_N),)``.

        PRO_EMBED_LN: as PRO_LN, but the rows are built, not loaded from ``x``: ``emb[tok[b]] + wpe[pos[b]]``
        in fp32 (``tok``, ``pos`` ``(B,)`` int64, ``emb``/``wpe`` ``(*, K)``), the same values the embedding
        kernel stores; program 0 stores them into ``x (B, K)`` (the residual stream the next kernels read),
        the other programs never touch ``x``. Every program reloads its K chunks of those two rows in the
        weight loop (L2 hits) rather than reading ``x``, which only program 0 writes.

        PREFETCH: the weight loop is software-pipelined (tile ``k + 1`` is loaded before tile ``k``'s
        math; the last load is fully masked), and the first tile and the bias are loaded before the
        PDL wait: weights are never written, so that overlaps the previous kernel's tail. Everything
        else (``x``, ``tok``/``pos`` and the ``emb``/``wpe`` rows they select, LayerNorm statistics, partials,
        ``res``) is read, and ``out`` (and ``x`` with PRO_EMBED_LN) written, after it.
        """
        pid = tl.program_id(0)
        rows = tl.arange(0, BP)
        rmask = rows < B
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        wdt = w_ptr.dtype.element_ty
        w_rows = w_ptr + cols[:, None] * K
        if PREFETCH:  # read-only parameters: safe before the wait
            k_first = tl.arange(0, BLOCK_K)
            w_next = tl.load(w_rows + k_first[None, :], mask=cmask[:, None] & (k_first < K)[None, :], other=0.0)
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if PDL:  # every program waits (module docstring): nothing written by a kernel is read above
            gdc_wait()
            if TRIGGER == 1:
                gdc_launch_dependents()
        if PROLOGUE == 3:  # the rows to embed: tokens / positions are written by earlier kernels (after the wait)
            tokr = tl.load(tok_ptr + rows, mask=rmask, other=0)
            posr = tl.load(pos_ptr + rows, mask=rmask, other=0)
        if PROLOGUE == 1 or PROLOGUE == 3:  # row statistics in fp32, two passes over the rows held in registers
            kr = tl.arange(0, BLOCK_ROW)
            mr = rmask[:, None] & (kr < K)[None, :]
            if PROLOGUE == 3:  # x = emb[tok] + wpe[pos] in fp32 (as _embed_kernel); program 0 stores it
                xr = tl.load(emb_ptr + tokr[:, None] * K + kr[None, :], mask=mr, other=0.0).to(tl.float32) \
                    + tl.load(wpe_ptr + posr[:, None] * K + kr[None, :], mask=mr, other=0.0).to(tl.float32)
                tl.store(x_ptr + rows[:, None] * K + kr[None, :], xr, mask=mr & (pid == 0))
            else:
                xr = tl.load(x_ptr + rows[:, None] * K + kr[None, :], mask=mr, other=0.0).to(tl.float32)
            mean = tl.sum(xr, 1) / K
            dr = tl.where(mr, xr - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(dr * dr, 1) / K + eps)
        acc = tl.zeros([BP, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            m2 = rmask[:, None] & kmask[None, :]
            if PREFETCH:  # the next tile's load goes out first, in flight during this tile's input and math
                w_cur = w_next
                kn = kk + BLOCK_K
                w_next = tl.load(w_rows + kn[None, :], mask=cmask[:, None] & (kn < K)[None, :], other=0.0)
            if PROLOGUE == 2:
                # y[b, k] = sum_s e^{m_s - M} acc_s[d] / sum_s e^{m_s - M} l_s, head = k // D, d = k % D
                sp = tl.arange(0, SPLITS)
                head = kk // HEAD_DIM
                dd = kk % HEAD_DIM
                hs = (rows[:, None, None] * (K // HEAD_DIM) + head[None, None, :]) * SPLITS + sp[None, :, None]
                m3 = rmask[:, None, None] & kmask[None, None, :]
                pm = tl.load(pm_ptr + hs, mask=m3, other=0.0)
                pl = tl.load(pl_ptr + hs, mask=m3, other=1.0)
                pa = tl.load(pacc_ptr + hs * HEAD_DIM + dd[None, None, :], mask=m3, other=0.0)
                mx = tl.max(pm, 1)
                wt = tl.exp(pm - mx[:, None, :])
                a = tl.sum(pa * wt, 1) / tl.sum(pl * wt, 1)
            else:
                if PROLOGUE == 3:  # the same fp32 sum as the statistics' rows (not x: only program 0 writes it)
                    a = tl.load(emb_ptr + tokr[:, None] * K + kk[None, :], mask=m2, other=0.0).to(tl.float32) \
                        + tl.load(wpe_ptr + posr[:, None] * K + kk[None, :], mask=m2, other=0.0).to(tl.float32)
                else:
                    a = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=m2, other=0.0).to(tl.float32)
                if PROLOGUE == 1 or PROLOGUE == 3:
                    g = tl.load(lnw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                    be = tl.load(lnb_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                    a = (a - mean[:, None]) * rstd[:, None] * g[None, :] + be[None, :]
            a = tl.where(m2, a.to(wdt).to(tl.float32), 0.0)  # the activation in the weight dtype, as torch has it
            if PREFETCH:  # this iteration's tile was loaded one iteration (or the wait) earlier
                w = w_cur.to(tl.float32)
            else:
                w = tl.load(w_rows + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            if BP == 1:  # batch 1 (the latency case): a plain 2-D reduction
                acc += tl.sum(w * tl.sum(a, 0)[None, :], 1)[None, :]
            else:
                acc += tl.sum(a[:, None, :] * w[None, :, :], 2)
        if PDL:
            if TRIGGER == 2:
                gdc_launch_dependents()
        if not PREFETCH:
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += bias[None, :]
        om = rmask[:, None] & cmask[None, :]
        if GELU:  # GPT-2 gelu_new on the product rounded to the weight dtype (the eager step's addmm output)
            u = acc.to(wdt).to(tl.float32)
            acc = 0.5 * u * (1.0 + _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)))
        if RESIDUAL:
            acc += tl.load(res_ptr + rows[:, None] * N + cols[None, :], mask=om, other=0.0)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)

    @triton.jit
    def _attn_span(q, k_ptr, v_ptr, lo, hi, scale, D: tl.constexpr, BLOCK: tl.constexpr):
        """Online softmax of ``q (D,)`` fp32 over cache positions ``[lo, hi)`` of one (row, head):
        ``k_ptr``/``v_ptr`` point at its ``(L, D)`` rows; ``BLOCK`` positions per iteration.
        Returns ``m (1,)``, ``l (1,)``, ``acc (D,)`` (fp32, ``acc`` un-normalised; ``-inf, 0, 0``
        for an empty span)."""
        d = tl.arange(0, D)
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK):
            ll = start + tl.arange(0, BLOCK)
            lm = ll < hi
            kt = tl.load(k_ptr + ll[:, None] * D + d[None, :], mask=lm[:, None], other=0.0).to(tl.float32)
            vt = tl.load(v_ptr + ll[:, None] * D + d[None, :], mask=lm[:, None], other=0.0).to(tl.float32)
            sc = tl.where(lm, tl.sum(kt * q[None, :], 1) * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * vt, 0)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _attn_kernel(qkv_ptr, k_ptr, v_ptr, pos_ptr, pm_ptr, pl_ptr, pacc_ptr, C, H, stride_b, stride_h, scale,
                     D: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr, SMALL: tl.constexpr,
                     BALANCED: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr):
        """Split ``s`` of (row ``b``, head ``h``): online softmax over its share of cache positions
        ``< positions[b]``; split 0 adds the new token from registers and writes its key/value into the
        caches ``(slots, H, L, D)`` at ``positions[b]``. Stores the partial ``m, l (B, H, S)``,
        ``acc (B, H, S, D)`` (fp32, un-normalised). Grid ``(B, H, SPLITS)``. PDL: nothing is read
        before the wait (``positions``, ``qkv`` and the caches are all written by earlier kernels; the
        first cache tile's address needs ``positions``)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        if PDL:
            gdc_wait()
            if TRIGGER == 1:
                gdc_launch_dependents()
        pos = tl.load(pos_ptr + b)
        d = tl.arange(0, D)
        base = qkv_ptr + b * 3 * C + h * D
        q = tl.load(base + d).to(tl.float32)
        cache = b * stride_b + h * stride_h
        if BALANCED:
            chunk = tl.cdiv(pos, SPLITS)
        else:
            chunk = tl.cdiv(tl.cdiv(pos, SPLITS), BLOCK) * BLOCK
        lo = s * chunk
        hi = tl.minimum(lo + chunk, pos)
        if SMALL > 0:
            if hi - lo <= SMALL:  # a share that fits one small tile (shorter caches)
                m_i, l_i, acc = _attn_span(q, k_ptr + cache, v_ptr + cache, lo, hi, scale, D, SMALL)
            else:
                m_i, l_i, acc = _attn_span(q, k_ptr + cache, v_ptr + cache, lo, hi, scale, D, BLOCK)
        else:
            m_i, l_i, acc = _attn_span(q, k_ptr + cache, v_ptr + cache, lo, hi, scale, D, BLOCK)
        if PDL:
            if TRIGGER == 2:
                gdc_launch_dependents()
        if s == 0:
            kn = tl.load(base + C + d)
            vn = tl.load(base + 2 * C + d)
            tl.store(k_ptr + cache + pos * D + d, kn.to(k_ptr.dtype.element_ty))
            tl.store(v_ptr + cache + pos * D + d, vn.to(v_ptr.dtype.element_ty))
            # from registers, rounded as the cache holds them
            kf = kn.to(k_ptr.dtype.element_ty).to(tl.float32)
            vf = vn.to(v_ptr.dtype.element_ty).to(tl.float32)
            sn = tl.sum(q * kf, 0) * scale
            m_new = tl.maximum(m_i, sn)
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sn - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha + p * vf
            m_i = m_new
        hs = (b * H + h) * SPLITS + s
        o = tl.arange(0, 1)
        tl.store(pm_ptr + hs + o, m_i)
        tl.store(pl_ptr + hs + o, l_i)
        tl.store(pacc_ptr + hs * D + d, acc)


# ---------------------------------------------------------------------------------- launchers
def gemv_blocks(n_rows: int, N: int, K: int, merge_splits: int = 0) -> tuple[int, int, int]:
    """(BP, BLOCK_N, BLOCK_K) for ``n_rows`` rows and an ``(N, K)`` weight (see the module constants);
    ``merge_splits``: the input is merged from that many attention partials (PRO_MERGE)."""
    bp = _pow2(n_rows)
    bn = MAX_BLOCK_N
    min_programs = MERGE_MIN_PROGRAMS if merge_splits else MIN_PROGRAMS
    while bn > 1 and -(-N // bn) < min_programs:
        bn //= 2
    bn = min(bn, _pow2(N))
    # tiles per loop iteration: (BP, BLOCK_N, BLOCK_K) products, and (BP, S, BLOCK_K) partials when merging
    bk = max(16, min(_pow2(K), TILE_ELEMS // (bp * max(bn, merge_splits))))
    return bp, bn, bk


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use programmatic dependent launch: CUDA, compute capability
    >= 9 (Hopper), real compilation (the interpreter cannot run ``griddepcontrol``'s inline PTX)."""
    if _INTERPRET or triton is None or gdc_wait is None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _pdl_launch(pdl: bool) -> tuple[dict, dict]:
    """(kernel constexprs, launch options) for a launch with programmatic dependent launch on or off;
    off: no gdc instruction and no ``launch_pdl`` option (the plain stream-ordered launch)."""
    if not pdl:
        return dict(PDL=False, TRIGGER=0), {}
    if PDL_TRIGGER not in PDL_TRIGGERS:
        raise ValueError(f"PDL_TRIGGER must be one of {', '.join(PDL_TRIGGERS)}, got {PDL_TRIGGER!r}")
    return dict(PDL=True, TRIGGER=PDL_TRIGGERS[PDL_TRIGGER]), dict(launch_pdl=True)


def gemv(x: Tensor, w: Tensor, bias: Tensor, out: Tensor, *, ln: tuple[Tensor, Tensor, float] | None = None,
         merge: tuple[Tensor, Tensor, Tensor] | None = None, gelu: bool = False, residual: bool = False,
         embed: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, pdl: bool = False) -> Tensor:
    """``out (B, N) = epilogue(prologue(x) @ w.T + bias)`` for ``w (N, K)`` contiguous.

    ``x (B, K)`` (any float dtype; ignored with ``merge``); ``ln = (weight (K,), bias (K,), eps)``
    normalises ``x`` first; ``merge = (m, l, acc)`` builds the input from attention partials
    (``(B, K/D, S)``, ``(B, K/D, S)``, ``(B, K/D, S, D)`` fp32). ``gelu``: tanh-GELU;
    ``residual``: adds ``out``'s own fp32 values (``out += ...``). ``embed = (tokens (B,), positions
    (B,) int64, emb (*, K), wpe (*, K))`` (with ``ln``, PRO_EMBED_LN): the input rows are
    ``emb[tokens] + wpe[positions]`` (fp32), also stored into ``x (B, K)`` fp32 (the fused
    :func:`embed`; ``x``'s old values are never read). ``pdl``: launch with programmatic
    dependent launch (CUDA sm_90+ only; see :func:`pdl_supported`). Returns ``out``.
    """
    B, (N, K) = out.shape[0], w.shape
    assert w.is_contiguous() and out.is_contiguous() and B <= MAX_BATCH, "gemv: (N, K) contiguous weight, B <= MAX_BATCH"
    assert not residual or out.dtype == torch.float32, "gemv: the residual stream is fp32"
    bp, bn, bk = gemv_blocks(B, N, K, merge[2].shape[-2] if merge is not None else 0)
    pro, head_dim, splits = PRO_NONE, 1, 1
    lnw = lnb = pm = pl = pa = x
    tok = pos = emb = wpe = x
    eps = 0.0
    if ln is not None:
        assert K <= MAX_LN_WIDTH, f"gemv: LayerNorm rows of {K} > {MAX_LN_WIDTH} do not fit in registers"
        pro, (lnw, lnb, eps) = PRO_LN, ln
    if embed is not None:
        assert ln is not None and merge is None and not residual, "gemv: embed is a LayerNorm prologue"
        tok, pos, emb, wpe = embed
        assert x.dtype == torch.float32 and x.is_contiguous() and x.shape == (B, K), "gemv: embed stores fp32 x (B, K)"
        assert emb.shape[1] == wpe.shape[1] == K and emb.is_contiguous() and wpe.is_contiguous()
        assert tok.shape == pos.shape == (B,) and tok.is_contiguous() and pos.is_contiguous()
        pro = PRO_EMBED_LN
    if merge is not None:
        pro, (pm, pl, pa) = PRO_MERGE, merge
        head_dim, splits = pa.shape[-1], pa.shape[-2]
        assert splits & (splits - 1) == 0, "gemv: KV_SPLITS must be a power of two"
    consts, opts = _pdl_launch(pdl)
    _gemv_kernel[(triton.cdiv(N, bn),)](x, lnw, lnb, pm, pl, pa, w, bias, out, out, tok, pos, emb, wpe,
                                        B, N, K, eps, BP=bp, BLOCK_N=bn, BLOCK_K=bk, PROLOGUE=pro, GELU=gelu,
                                        RESIDUAL=residual, HEAD_DIM=head_dim, SPLITS=splits,
                                        BLOCK_ROW=_pow2(K) if ln is not None else 1,
                                        PREFETCH=bool(GEMV_PREFETCH), num_warps=GEMV_WARPS, **consts, **opts)
    return out


def attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, n_head: int,
              partials: tuple[Tensor, Tensor, Tensor], pdl: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Decode attention of ``qkv (B, 3C)`` against cache rows ``0..B-1`` of ``k_cache``/``v_cache``
    ``(slots, H, L, D)`` (contiguous) up to ``positions (B,)`` int64, writing the new key/value at
    ``positions``. Fills and returns ``partials = (m, l, acc)`` (see :func:`gemv`'s ``merge``).
    ``pdl``: as :func:`gemv`'s."""
    B, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    m, l, acc = partials
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and qkv.is_contiguous()
    assert BLOCK_L & (BLOCK_L - 1) == 0 and D & (D - 1) == 0, "attention: BLOCK_L and head_dim must be powers of two"
    consts, opts = _pdl_launch(pdl)
    _attn_kernel[(B, n_head, acc.shape[2])](qkv, k_cache, v_cache, positions, m, l, acc, C, n_head,
                                            k_cache.stride(0), k_cache.stride(1), 1.0 / D ** 0.5,
                                            D=D, SPLITS=acc.shape[2], BLOCK=BLOCK_L,
                                            SMALL=ATTN_SMALL_BLOCK if 0 < ATTN_SMALL_BLOCK < BLOCK_L else 0,
                                            BALANCED=bool(ATTN_BALANCED), num_warps=ATTN_WARPS,
                                            **consts, **opts)
    return partials


def embed(tokens: Tensor, positions: Tensor, emb: Tensor, wpe: Tensor, out: Tensor, pdl: bool = False) -> Tensor:
    """``out (B, C) fp32 = emb[tokens] + wpe[positions]`` for ``tokens, positions (B,)`` int64.
    ``pdl``: as :func:`gemv`'s."""
    C = emb.shape[1]
    consts, opts = _pdl_launch(pdl)
    _embed_kernel[(out.shape[0],)](tokens, positions, emb, wpe, out, C, BLOCK_C=_pow2(C), **consts, **opts)
    return out


# ---------------------------------------------------------------------------------- weights
def relayout_conv1d(model: T3Model) -> None:
    """Store every transformer ``Conv1D.weight`` ``(in, out)`` as ``(out, in)`` contiguous memory and
    make the parameter its transposed view (same values and shape, strides ``(1, in)``). Idempotent;
    no extra memory once done (the old storage is freed)."""
    with torch.no_grad():
        for block in model.tfmr.h:
            for name in GPT2_LINEARS:
                conv = block.get_submodule(name)
                w = conv.weight
                if not w.t().is_contiguous():
                    conv.weight.data = w.data.t().contiguous().t()


def out_major(conv) -> Tensor:
    """A ``Conv1D``'s weight as ``(out, in)`` contiguous (after :func:`relayout_conv1d`: a free view)."""
    wt = conv.weight.t()
    if not wt.is_contiguous():
        raise ValueError("Conv1D weight is not out-major; call relayout_conv1d(model) first")
    return wt


# ---------------------------------------------------------------------------------- the step
class FusedDecode:
    """``decode_step`` (T = 1) for ``B <= max_batch`` rows in ``5 · n_layer + 2`` Triton kernels
    (``+ 1`` without the separate embedding kernel, :data:`FUSE_EMBED`).

    Re-lays the model's ``Conv1D`` weights out in place (:func:`relayout_conv1d`; the torch path
    keeps working on the views) and keeps references to the parameters: build it after the model
    has its final device and dtype. On CUDA, Triton compiles each kernel variant on its first
    call (run a step per batch size before capturing graphs); on CPU it needs ``TRITON_INTERPRET=1``
    set before Triton is imported.

    ``pdl``: launch with programmatic dependent launch (module docstring); set once from the device
    (:func:`pdl_supported`: CUDA sm_90+), and turned off by the engine if capturing or checking the
    PDL step fails. Each call also reads the module's :data:`PDL` switch (:attr:`pdl_active`).
    """

    def __init__(self, model: T3Model, max_batch: int = MAX_BATCH):
        if triton is None:
            raise RuntimeError("Triton is not installed")
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be 1..{MAX_BATCH}, got {max_batch}")
        dev = model.speech_head.weight.device
        if dev.type != "cuda" and not _INTERPRET:
            raise RuntimeError(f"the Triton decode step needs CUDA (or TRITON_INTERPRET=1 for tests), model is on {dev}")
        relayout_conv1d(model)
        self.model, self.max_batch = model, max_batch
        self.pdl = pdl_supported(dev)
        cfg = model.cfg
        self.n_head, self.eps, self.C = cfg.n_head, cfg.layer_norm_eps, cfg.n_embd
        self.layers = []
        for blk in model.tfmr.h:
            a, m = blk.attn, blk.mlp
            self.layers.append(dict(
                ln1=(blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps), qkv=(out_major(a.c_attn), a.c_attn.bias),
                proj=(out_major(a.c_proj), a.c_proj.bias), ln2=(blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps),
                fc=(out_major(m.c_fc), m.c_fc.bias), mproj=(out_major(m.c_proj), m.c_proj.bias)))
        ln_f = model.tfmr.ln_f
        self.ln_f = (ln_f.weight, ln_f.bias, ln_f.eps)
        self.head = (model.speech_head.weight, model.speech_head.bias)  # nn.Linear: already (V, C)

    @property
    def pdl_active(self) -> bool:
        """Whether the next :meth:`logits` launches with PDL (device support, not turned off, :data:`PDL`)."""
        return self.pdl and bool(PDL)

    def logits(self, cache: KVCache, n_rows: int, tokens: Tensor, positions: Tensor, length: int | None = None,
               *, residual: Tensor | None = None) -> Tensor:
        """Same contract as :func:`token_service.t3.generate.decode_step`: feed ``tokens (B,)`` at
        ``positions (B,)`` (int64, on the device) for cache slots ``0..B-1``; returns logits ``(B, V)``
        float32. ``length`` is ignored: each row attends to positions ``<= positions[b]``.
        ``residual``: a ``(B, C)`` fp32 contiguous buffer for the residual stream (left holding the
        last layer's output; tests), default a fresh one. With :data:`FUSE_EMBED` the embedding is
        built by the first layer's ln_1 + c_attn GEMV (PRO_EMBED_LN), else by its own kernel."""
        B, C, H = n_rows, self.C, self.n_head
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"FusedDecode serves 1..{self.max_batch} rows, got {B}")
        m = self.model
        dev, wdt = tokens.device, m.speech_head.weight.dtype
        tokens, positions = tokens.contiguous(), positions.contiguous()
        x = torch.empty(B, C, dtype=torch.float32, device=dev) if residual is None else residual  # the residual stream
        assert x.shape == (B, C) and x.dtype == torch.float32 and x.is_contiguous(), "residual: (B, C) fp32 contiguous"
        qkv = torch.empty(B, 3 * C, dtype=wdt, device=dev)
        hid = torch.empty(B, 4 * C, dtype=wdt, device=dev)
        part = (torch.empty(B, H, KV_SPLITS, dtype=torch.float32, device=dev),
                torch.empty(B, H, KV_SPLITS, dtype=torch.float32, device=dev),
                torch.empty(B, H, KV_SPLITS, C // H, dtype=torch.float32, device=dev))
        out = torch.empty(B, self.head[0].shape[0], dtype=torch.float32, device=dev)
        # Triton launches on the current CUDA device: make it the model's
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            pdl = self.pdl_active
            emb = (tokens, positions, m.speech_emb.weight, m.tfmr.wpe.weight)
            fuse = bool(FUSE_EMBED)
            if not fuse:
                embed(*emb, x, pdl=pdl)
            for i, L in enumerate(self.layers):
                gemv(x, *L["qkv"], qkv, ln=L["ln1"], embed=emb if fuse and i == 0 else None, pdl=pdl)
                attention(qkv, cache.k[i], cache.v[i], positions, H, part, pdl=pdl)
                gemv(x, *L["proj"], x, merge=part, residual=True, pdl=pdl)
                gemv(x, *L["fc"], hid, ln=L["ln2"], gelu=True, pdl=pdl)
                gemv(hid, *L["mproj"], x, residual=True, pdl=pdl)
            return gemv(x, *self.head, out, ln=self.ln_f, pdl=pdl)
