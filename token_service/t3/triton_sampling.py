"""T3's sampling in Triton, ONE kernel each: the hashed draw (:func:`sample_race`) and the whole
sampler (:func:`sample_fused`); opt-in with the Triton decode step (issue 6).

:func:`token_service.t3.sampling.sample` is ``argmax(probs / -log(hashed_uniform(seed, step, vhash)))``:
three ``hash32`` mixes, ``bits_to_unit``, a log, a division and an argmax: 42 small kernels at
batch 1 (44 aten ops, 2 of them views). :func:`sample_race` computes the same draw in one kernel,
grid ``(B,)``: each program walks its row of ``probs`` in blocks of :data:`BLOCK_V` ids, keeping
per lane the best score and its (first) id, and reduces the lanes at the end (ties -> lowest id, as ``torch.argmax``).

Exactness: the integer hash runs on ``uint32`` (wrapping products, logical shifts), so the 32-bit
hashes and the uniforms ``(k + 0.5) / 2**23`` are bit-for-bit those of
:func:`~token_service.t3.sampling.hashed_uniform`. On CUDA ``-log(u)`` is libdevice's ``logf`` (the
function torch's CUDA ``log`` calls) and the division rounds to nearest (``div_rn``, as torch's
``/``), so the GPU draw should equal torch's bit for bit; under the interpreter (CPU tests) the log
is NumPy's. Wherever the log implementations differ by an ulp, the drawn id can differ from torch's
only on float near-ties of ``p / E`` between two ids (never a filtered id: ``p = 0`` scores 0 while
the row's maximum is > 0). A NaN score (a NaN row of ``probs``) wins, first NaN id, as in ``torch.argmax``.

The whole sampler, :func:`sample_fused`: ``process_logits`` (temperature -> top-k -> top-p ->
repetition penalty), ``softmax`` and the draw above in ONE kernel (~25 torch kernels + the draw before).
Grid ``(B,)``; each program holds its row in registers (one block of ``next_pow2(V)`` lanes, at most
:data:`MAX_FUSED_V`; Turbo's 6563 ids: 8192 lanes) and runs:

1. ``s = logits / T`` (IEEE division, as torch's), and the order-preserving ``uint32`` key of each ``s``
   (``-0.0`` keyed as ``+0.0``: torch compares floats).
2. top-k (skipped when ``k >= V``): the k-th largest key by a radix search from the top bit,
   :data:`DIGIT_BITS` (2) bits a round, 16 rounds; a round counts ``key >= candidate`` for the 3
   non-zero values of the next digit in ONE block reduction (2 int32 sums, two counts packed in 16-bit
   fields); then ``s < kth -> -inf`` (ties with the k-th kept, as torch). Exact.
3. top-p (only if the row's ``top_p_on``): ``p = softmax(s)``, then the same radix search (16
   rounds, each ONE block reduction of 3 masked sums) for the largest key ``t`` whose mass
   ``sum(p[key <= t]) <= 1 - top_p``; ids with ``key <= t`` are dropped, except the row's largest value.
4. the repetition penalty on ``seen`` ids (``s < 0 ? s * r : s / r``, IEEE division), then softmax and
   the race draw of :func:`sample_race` (same hash, uniforms, log and division).

So a row costs 32 block reductions for the two searches plus 8 (maxima and sums of the two softmaxes,
the largest key, the argmax's max and min), no sort, no global memory traffic beyond reading its
logits, seen mask and hashes once.

Exactness against ``sample(process_logits(...).softmax(-1), ...)`` (the full-sort torch path):
temperature, top-k and the penalty are bit-exact (``sample_fused_scores`` returns the processed scores:
equal to ``process_logits``'s, ``-inf`` pattern included), with two top-p exceptions:

* ties: HF sorts the survivors and compares each position's running sum, so equal values straddling
  the threshold are split by the sort's tie order (and the largest value, if tied, keeps only one
  copy); the kernel compares each value's mass ``sum(p[s <= v])``, so a tie group is kept or dropped
  whole (all copies of the largest value are kept);
* rounding: the kernel's sums (a reduction tree, its own ``exp``) and torch's ``cumsum`` of its
  ``softmax`` can round differently, so a value whose mass lies within float rounding (~1e-6) of
  ``1 - top_p`` may be kept by one and dropped by the other.

The drawn id can differ from torch's only on float near-ties of ``p / E`` (``exp``, ``log`` and the
softmax sum may round differently; on CUDA ``exp`` and ``log`` are libdevice's, as torch's). NaN logits
are not supported (a NaN ranks above ``+inf`` in the top-k search). A row of all ``-inf`` draws id 0,
as torch (its softmax is NaN).

:func:`sample_fused_step` is the same kernel with its ``STATE`` flag on: after the draw, program ``b``
also does the decode step's bookkeeping of its row (``tokens[b] = sampled[b] = t``, ``seen[b, t] = True``,
``positions[b] += active[b]``, ``step[b] += 1``), replacing the 5 small torch kernels that followed the
sampler in ``ModelRunner._decode_body``. With ``pdl=True`` (the Triton step's PDL on, :data:`SAMPLER_PDL`,
and :func:`~token_service.t3.triton_decode.pdl_supported`: CUDA sm_90+, never the interpreter) it is
launched with programmatic dependent launch, so it can be scheduled while the head GEMV finishes: every
program executes ``griddepcontrol.wait`` FIRST, before any load or store (the logits come from the head
GEMV; ``seen``/``step``/``positions``/``tokens`` were written by earlier steps and by the previous
kernels' chain, see the hazard rules in ``triton_decode``'s docstring), and it never calls
``launch_dependents`` (the op after it is a plain launch: a copy or the next graph). Otherwise it
launches plainly: it starts after the head GEMV has completed. Either way the next step's first Triton
kernel reads ``tokens`` / ``positions`` only after its own ``griddepcontrol.wait``.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

try:  # Triton is optional: without it the runner never takes the Triton path
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = tl = libdevice = None
try:  # griddepcontrol (Triton >= 3.3); without it triton_decode.pdl_supported is False: no PDL launch
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # pragma: no cover
    gdc_wait = None

# One program per row runs on one SM: enough warps to hide the latency of the integer/log chains.
# First guesses for an H100, not yet measured (bench/tune_triton_decode.py --engine-step times the step).
BLOCK_V = 2048  # ids per loop iteration (Turbo's 6563 speech ids: 4 iterations, 4 ids per thread each)
NUM_WARPS = 16
# sample_fused: the row lives in registers (one block of next_pow2(V) lanes, 16 per thread at 8192 / 16 warps)
MAX_FUSED_V = 8192
FUSED_NUM_WARPS = 16
# bits of the key decided per search round (1 or 2): 32 / DIGIT_BITS rounds per search, each ONE block
# reduction (of 1 or 3 counts / sums). 2 halves the rounds; compiled for sm_90 at 8192 lanes / 16 warps:
# 125 registers, no spills, 116 barriers (DIGIT_BITS = 1: 212 barriers, ~25 % fewer instructions).
# First guess, not yet measured on an H100 (bench/tune_triton_decode.py --engine-step).
DIGIT_BITS = 2
# sample_fused_step launched with programmatic dependent launch after the head GEMV (module doc), where the
# Triton step's PDL is on (the runner passes FusedDecode.pdl_active; never under the interpreter or below
# sm_90). H100 (bench/NOTES.md run 52, whole step at batch 1): 0.5909 ms off, 0.5910 on: no gain, so off.
SAMPLER_PDL = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_TUPLE_REDUCE = not _INTERPRET  # sample_fused's top-p sums in one reduction (tests force it on small rows)

if triton is not None:
    if _INTERPRET:
        from .triton_decode import _interpreter_numpy_fix

        _interpreter_numpy_fix()

    @triton.jit
    def _hash32(x):
        """``tts_common.hashing.hash32`` on uint32 (products wrap mod 2**32, ``>>`` is logical)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _mix_key(seed, step):
        """Per-row key ``hash32(hash32(seed ^ 0x9E3779B9) ^ (step mod 2**32))`` of int64 scalars (uint32)."""
        return _hash32(_hash32(seed.to(tl.uint32) ^ 0x9E3779B9) ^ step.to(tl.uint32))

    @triton.jit
    def _row_key(seed_ptr, step_ptr, b):
        """:func:`_mix_key` of row ``b``'s seed and step (loaded here)."""
        return _mix_key(tl.load(seed_ptr + b), tl.load(step_ptr + b))

    @triton.jit
    def _uniform(key, vh):
        """``bits_to_unit(hash32(key ^ vhash))`` as float32 in (0, 1)."""
        bits = _hash32(key ^ vh.to(tl.uint32))
        return ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)

    @triton.jit
    def _race_kernel(probs_ptr, seed_ptr, step_ptr, vh_ptr, out_ptr, V, stride_p,
                     BLOCK: tl.constexpr, PRECISE: tl.constexpr):
        """out[b] = argmax_i probs[b, i] / -log(u[b, i]), first index on ties. Grid (B,)."""
        b = tl.program_id(0)
        key = _row_key(seed_ptr, step_ptr, b)
        lanes = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], -1.0, tl.float32)  # every real score is >= 0 (or NaN -> +inf)
        best_i = tl.zeros([BLOCK], tl.int32)
        row = probs_ptr + b.to(tl.int64) * stride_p
        for start in range(0, V, BLOCK):
            i = start + lanes
            m = i < V
            p = tl.load(row + i, mask=m, other=0.0)
            u = _uniform(key, tl.load(vh_ptr + i, mask=m, other=0))
            if PRECISE:
                e = -libdevice.log(u)
                s = tl.div_rn(p, e)
            else:
                e = -tl.log(u)
                s = p / e
            s = tl.where(s != s, float("inf"), s)  # NaN wins, as in torch.argmax
            s = tl.where(m, s, -1.0)
            take = s > best  # strict: a lane keeps its first id among equal scores
            best = tl.where(take, s, best)
            best_i = tl.where(take, i, best_i)
        top = tl.max(best, axis=0)
        idx = tl.min(tl.where(best == top, best_i, V), axis=0)
        tl.store(out_ptr + b, idx.to(tl.int64))

    @triton.jit
    def _float_key(x):
        """Order-preserving ``uint32`` key of float32 ``x``: ``a < b`` <=> ``key(a) < key(b)`` (-0.0 as +0.0)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(bits == 0x80000000, bits ^ bits, bits)
        return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)

    @triton.jit
    def _add2(a0, b0, a1, b1):
        return a0 + a1, b0 + b1

    @triton.jit
    def _add3(a0, b0, c0, a1, b1, c1):
        return a0 + a1, b0 + b1, c0 + c1

    @triton.jit
    def _kth_key(key, k, DIGIT_BITS: tl.constexpr, TUPLE_REDUCE: tl.constexpr):
        """Largest ``t`` with ``count(key >= t) >= k`` (the k-th largest key; ``1 <= k <= len``), decided
        ``DIGIT_BITS`` (1 or 2) bits per round from the top. With 2 bits, a round counts the 3 candidate
        digits 1..3 (digit 0, ``t`` itself, always qualifies) in 2 int32 sums, the first two counts packed
        in 16-bit fields (a count is <= MAX_FUSED_V < 2**15), with ``TUPLE_REDUCE`` in ONE block reduction."""
        t = tl.full([], 0, tl.uint32)
        for r in tl.static_range(32 // DIGIT_BITS):
            shift = 32 - DIGIT_BITS * (r + 1)
            if DIGIT_BITS == 1:
                t = t | ((tl.sum((key >= (t | (1 << shift))).to(tl.int32), axis=0) >= k).to(tl.uint32) << shift)
            else:
                lo = tl.where(key >= (t | (1 << shift)), 1, 0) + tl.where(key >= (t | (2 << shift)), 65536, 0)
                hi = tl.where(key >= (t | (3 << shift)), 1, 0)
                if TUPLE_REDUCE:
                    lo, hi = tl.reduce((lo, hi), 0, _add2)
                else:
                    lo, hi = tl.sum(lo, axis=0), tl.sum(hi, axis=0)
                digit = ((lo & 0xFFFF) >= k).to(tl.uint32) + ((lo.to(tl.uint32) >> 16) >= k).to(tl.uint32) \
                    + (hi >= k).to(tl.uint32)  # the qualifying digits are 0 .. digit (monotone)
                t = t | (digit << shift)
        return t

    @triton.jit
    def _mass_key(key, p, limit, DIGIT_BITS: tl.constexpr, TUPLE_REDUCE: tl.constexpr):
        """Largest ``t`` with ``sum(p[key <= t]) <= limit`` (``p >= 0``; 0 if none), ``DIGIT_BITS`` (1 or 2)
        bits a round: 1 or 3 masked sums, with ``TUPLE_REDUCE`` in one block reduction (on the GPU; the
        interpreter runs a tuple reduction element by element in Python, so it sums them one by one).
        Every sum uses the same reduction order, so the sums grow with ``t`` (float addition is
        monotone) and the search is consistent."""
        t = tl.full([], 0, tl.uint32)
        for r in tl.static_range(32 // DIGIT_BITS):
            shift = 32 - DIGIT_BITS * (r + 1)
            if DIGIT_BITS == 1:
                mass = tl.sum(tl.where(key <= (t | (1 << shift)), p, 0.0), axis=0)
                t = t | ((mass <= limit).to(tl.uint32) << shift)
            else:
                p1 = tl.where(key <= (t | (1 << shift)), p, 0.0)
                p2 = tl.where(key <= (t | (2 << shift)), p, 0.0)
                p3 = tl.where(key <= (t | (3 << shift)), p, 0.0)
                if TUPLE_REDUCE:
                    m1, m2, m3 = tl.reduce((p1, p2, p3), 0, _add3)
                else:
                    m1, m2, m3 = tl.sum(p1, axis=0), tl.sum(p2, axis=0), tl.sum(p3, axis=0)
                digit = (m1 <= limit).to(tl.uint32) + (m2 <= limit).to(tl.uint32) + (m3 <= limit).to(tl.uint32)
                t = t | (digit << shift)
        return t

    @triton.jit
    def _softmax(s, PRECISE: tl.constexpr):
        """``softmax(s)`` of a row held in registers (``exp(s - max) / sum``, IEEE division)."""
        z = s - tl.max(s, axis=0)
        e = libdevice.exp(z) if PRECISE else tl.exp(z)
        return tl.div_rn(e, tl.sum(e, axis=0))

    @triton.jit
    def _sampler_kernel(logits_ptr, seen_ptr, temp_ptr, topk_ptr, thr_ptr, topp_on_ptr, pen_ptr, seed_ptr,
                        step_ptr, vh_ptr, out_ptr, scores_ptr, sampled_ptr, pos_ptr, active_ptr, V, stride_l,
                        stride_s, BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr, PRECISE: tl.constexpr,
                        TUPLE_REDUCE: tl.constexpr, SCORES: tl.constexpr, STATE: tl.constexpr,
                        PDL: tl.constexpr):
        """out[b] = sample(process_logits(logits, ...)[b].softmax(), ...) (module doc). Grid (B,).
        ``SCORES``: also write the processed scores (before the softmax) to ``scores[b, :V]`` (tests).
        ``STATE``: then the decode step's bookkeeping of row ``b`` (:func:`sample_fused_step`):
        ``sampled[b] = t``, ``seen[b, t] = True``, ``pos[b] += active[b]``, ``step[b] += 1``.
        ``PDL``: launched with programmatic dependent launch; every program waits for the previous kernel
        (the head GEMV) before its first load or store, and never triggers its dependents (module doc)."""
        if PDL:  # FIRST, unconditionally: every input below may be written by the kernels before this one
            gdc_wait()
        b = tl.program_id(0)
        step = tl.load(step_ptr + b)  # read ONCE, before anything is written (STATE increments it below)
        i = tl.arange(0, BLOCK)
        m = i < V
        x = tl.load(logits_ptr + b.to(tl.int64) * stride_l + i, mask=m, other=float("-inf"))
        # 1. temperature
        s = tl.where(m, tl.div_rn(x, tl.load(temp_ptr + b)), float("-inf"))
        key = tl.where(m, _float_key(s), 0)  # padding lanes: below every real key
        # 2. top-k: keep s >= the k-th largest
        k = tl.minimum(tl.maximum(tl.load(topk_ptr + b), 1), V).to(tl.int32)
        if k < V:  # k = V keeps every value
            s = tl.where(key >= _kth_key(key, k, DIGIT_BITS, TUPLE_REDUCE), s, float("-inf"))
        # 3. top-p: drop the values whose mass sum(p[s <= v]) <= 1 - top_p, the largest one kept
        if tl.load(topp_on_ptr + b) != 0:
            key = tl.where(m, _float_key(s), 0)
            t = _mass_key(key, _softmax(s, PRECISE), tl.load(thr_ptr + b), DIGIT_BITS, TUPLE_REDUCE)
            t = tl.minimum(t, tl.max(key, axis=0) - 1)
            s = tl.where(key <= t, float("-inf"), s)
        # 4. repetition penalty on the seen ids (after the filters: -inf stays -inf)
        pen = tl.load(pen_ptr + b)
        seen = tl.load(seen_ptr + b.to(tl.int64) * stride_s + i, mask=m, other=0) != 0
        s = tl.where(seen, tl.where(s < 0, s * pen, tl.div_rn(s, pen)), s)
        if SCORES:
            tl.store(scores_ptr + b.to(tl.int64) * V + i, s, mask=m)
        # softmax + the exponential race (as _race_kernel)
        p = _softmax(s, PRECISE)
        u = _uniform(_mix_key(tl.load(seed_ptr + b), step), tl.load(vh_ptr + i, mask=m, other=0))
        if PRECISE:
            e = -libdevice.log(u)
        else:
            e = -tl.log(u)
        score = tl.div_rn(p, e)
        score = tl.where(score != score, float("inf"), score)  # NaN wins, as in torch.argmax
        score = tl.where(m, score, -1.0)
        top = tl.max(score, axis=0)
        t = tl.min(tl.where(score == top, i, BLOCK), axis=0)
        tl.store(out_ptr + b, t.to(tl.int64))
        if STATE:
            # The decode step's bookkeeping, the LAST thing the program does. Ordering: the draw read
            # step[b] (``step`` above) and the whole row seen[b, :] before this point; every store below is
            # masked by ``t < V`` (always true), so it depends on ``t``, i.e. on the block reductions of the
            # draw, which every thread reaches only after its own loads of seen / step: no thread can write
            # step[b] or seen[b, t] before another thread of the program has read them. The increment stores
            # the value read at the start (no second load of step[b]); positions / active / sampled are
            # never read by the draw. Program b touches only row b, so the programs do not race.
            ok = t < V
            t64 = t.to(tl.int64)
            tl.store(sampled_ptr + b, t64, mask=ok)
            # seen is torch.bool: Triton stores through a *i1 pointer as int8 (1 byte, value 1 = True)
            tl.store(seen_ptr + b.to(tl.int64) * stride_s + t64, tl.full([], 1, tl.int8), mask=ok)
            tl.store(pos_ptr + b, tl.load(pos_ptr + b) + tl.load(active_ptr + b), mask=ok)
            tl.store(step_ptr + b, step + 1, mask=ok)

    @triton.jit
    def _uniform_kernel(seed_ptr, step_ptr, vh_ptr, out_ptr, V, BLOCK: tl.constexpr):
        """Debug/test entry: out[b, i] = the uniform the race uses (bit-exact check). Grid (B, cdiv(V, BLOCK))."""
        b = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = i < V
        u = _uniform(_row_key(seed_ptr, step_ptr, b), tl.load(vh_ptr + i, mask=m, other=0))
        tl.store(out_ptr + b.to(tl.int64) * V + i, u, mask=m)

    @triton.jit
    def _hash_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        """Debug/test entry: out[i] = hash32(x[i]) on all 32 bits (int64 in and out). Grid (cdiv(N, BLOCK),)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        x = tl.load(x_ptr + i, mask=m, other=0).to(tl.uint32)
        tl.store(out_ptr + i, _hash32(x).to(tl.int64), mask=m)


def _check_device(dev: torch.device) -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed")
    if dev.type != "cuda" and not _INTERPRET:
        raise RuntimeError(f"the Triton sampling draw needs CUDA (or TRITON_INTERPRET=1 for tests), tensors are on {dev}")


def _check(probs: Tensor | None, seed: Tensor, step: Tensor, vhash: Tensor) -> None:
    _check_device(vhash.device)
    B = seed.shape[0]
    if seed.dtype != torch.int64 or step.dtype != torch.int64 or vhash.dtype != torch.int64:
        raise TypeError("seed, step and vhash must be int64")
    if step.shape != (B,) or seed.dim() != 1 or vhash.dim() != 1:
        raise ValueError(f"seed and step must be (B,) and vhash (V,), got {tuple(seed.shape)}, "
                         f"{tuple(step.shape)}, {tuple(vhash.shape)}")
    if probs is not None:
        if probs.dtype != torch.float32 or probs.shape != (B, vhash.shape[0]) or probs.stride(-1) != 1:
            raise ValueError(f"probs must be float32 (B, V) = ({B}, {vhash.shape[0]}) with unit stride over V, "
                             f"got {probs.dtype} {tuple(probs.shape)} strides {probs.stride()}")


def sample_race(probs: Tensor, seed: Tensor, step: Tensor, vhash: Tensor) -> Tensor:
    """:func:`token_service.t3.sampling.sample` in one kernel: ``probs (B, V)`` float32, ``seed``,
    ``step`` ``(B,)`` int64 (seed < 2**32), ``vhash`` ``(V,)`` int64 -> ids ``(B,)`` int64.
    Same ids as ``sample`` except, where the log differs by an ulp, on float near-ties (module doc)."""
    _check(probs, seed, step, vhash)
    B, V = probs.shape
    out = torch.empty(B, dtype=torch.int64, device=probs.device)
    with torch.cuda.device(probs.device) if probs.device.type == "cuda" else contextlib.nullcontext():
        _race_kernel[(B,)](probs, seed.contiguous(), step.contiguous(), vhash.contiguous(), out, V, probs.stride(0),
                           BLOCK=BLOCK_V, PRECISE=not _INTERPRET, num_warps=NUM_WARPS)
    return out


def race_uniform(seed: Tensor, step: Tensor, vhash: Tensor) -> Tensor:
    """The uniforms ``(B, V)`` float32 the kernel draws with (for tests: equal to ``hashed_uniform``)."""
    _check(None, seed, step, vhash)
    B, V = seed.shape[0], vhash.shape[0]
    out = torch.empty(B, V, dtype=torch.float32, device=vhash.device)
    with torch.cuda.device(vhash.device) if vhash.device.type == "cuda" else contextlib.nullcontext():
        _uniform_kernel[(B, triton.cdiv(V, BLOCK_V))](seed.contiguous(), step.contiguous(), vhash.contiguous(), out, V,
                                                     BLOCK=BLOCK_V, num_warps=NUM_WARPS)
    return out


def race_hash32(x: Tensor) -> Tensor:
    """The kernel's ``hash32`` on int64 values in [0, 2**32) (for tests: equal to ``tts_common.hashing.hash32``)."""
    _check_device(x.device)
    x = x.contiguous()
    out = torch.empty_like(x)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _hash_kernel[(triton.cdiv(x.numel(), BLOCK_V),)](x, out, x.numel(), BLOCK=BLOCK_V, num_warps=NUM_WARPS)
    return out


def _check_fused(logits: Tensor, seen: Tensor, rows: dict[str, tuple[Tensor, torch.dtype]],
                 seed: Tensor, step: Tensor, vhash: Tensor) -> None:
    _check(None, seed, step, vhash)
    B, V = seed.shape[0], vhash.shape[0]
    if V > MAX_FUSED_V:
        raise ValueError(f"sample_fused holds a row in registers: vocabulary {V} > MAX_FUSED_V = {MAX_FUSED_V}")
    for name, t, dtype in (("logits", logits, torch.float32), ("seen", seen, torch.bool)):
        if t.dtype != dtype or t.shape != (B, V) or t.stride(-1) != 1:
            raise ValueError(f"{name} must be {dtype} ({B}, {V}) with unit stride over V, "
                             f"got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    for name, (t, dtype) in rows.items():
        if t.dtype != dtype or t.shape != (B,):
            raise ValueError(f"{name} must be {dtype} ({B},), got {t.dtype} {tuple(t.shape)}")
    for name, t in (("logits", logits), ("seen", seen), ("seed", seed), ("step", step),
                    *((name, t) for name, (t, _) in rows.items())):
        if t.device != vhash.device:
            raise ValueError(f"{name} is on {t.device}, vhash on {vhash.device}")


def _check_state(state: dict[str, Tensor], B: int, dev: torch.device) -> None:
    """The tensors :func:`sample_fused_step` writes in place (or reads: ``active``): ``(B,)`` int64,
    unit stride (a copy would take the writes), on the sampler's device."""
    for name, t in state.items():
        if t.dtype != torch.int64 or t.shape != (B,) or t.stride(0) != 1:
            raise ValueError(f"{name} must be int64 ({B},) with unit stride (updated in place), "
                             f"got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, vhash on {dev}")


def _sampler(logits: Tensor, seen: Tensor, temperature: Tensor, top_k: Tensor, top_p_threshold: Tensor,
             top_p_on: Tensor, penalty: Tensor, seed: Tensor, step: Tensor, vhash: Tensor,
             scores: bool, state: dict[str, Tensor] | None = None, pdl: bool = False) -> tuple[Tensor, Tensor | None]:
    """Launch :func:`_sampler_kernel`. ``state`` (``tokens``, ``sampled``, ``positions``, ``active``):
    the STATE variant, which writes the ids to ``tokens`` (returned) and updates ``step`` / ``seen`` in place.
    ``pdl``: asked for programmatic dependent launch; effective only with :data:`SAMPLER_PDL` on a device
    where ``triton_decode.pdl_supported`` (CUDA sm_90+, not the interpreter)."""
    rows = dict(temperature=(temperature, torch.float32), top_k=(top_k, torch.int64),
                top_p_threshold=(top_p_threshold, torch.float32), top_p_on=(top_p_on, torch.bool),
                penalty=(penalty, torch.float32))
    _check_fused(logits, seen, rows, seed, step, vhash)
    if DIGIT_BITS not in (1, 2):
        raise ValueError(f"triton_sampling.DIGIT_BITS must be 1 or 2, got {DIGIT_BITS}")
    B, V = logits.shape
    dev = logits.device
    if state is not None:
        _check_state(dict(state, step=step), B, dev)
        out, sampled, positions, active = state["tokens"], state["sampled"], state["positions"], state["active"]
    else:
        out = torch.empty(B, dtype=torch.int64, device=dev)
        sampled = positions = active = out  # not touched (STATE off)
    sc = torch.empty(B, V, dtype=torch.float32, device=dev) if scores else out
    per_row = [t.contiguous() for t, _ in rows.values()]
    pdl = sampler_pdl(pdl, dev)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _sampler_kernel[(B,)](logits, seen, *per_row, seed.contiguous(), step.contiguous(), vhash.contiguous(), out,
                              sc, sampled, positions, active, V, logits.stride(0), seen.stride(0),
                              BLOCK=max(16, triton.next_power_of_2(V)), DIGIT_BITS=DIGIT_BITS,
                              PRECISE=not _INTERPRET, TUPLE_REDUCE=_TUPLE_REDUCE, SCORES=scores,
                              STATE=state is not None, PDL=pdl, num_warps=FUSED_NUM_WARPS,
                              **(dict(launch_pdl=True) if pdl else {}))
    return out, (sc if scores else None)


def sampler_pdl(pdl: bool, dev: torch.device) -> bool:
    """Whether a :func:`sample_fused_step` asked for ``pdl`` launches with programmatic dependent launch on
    ``dev``: asked, :data:`SAMPLER_PDL` on, and ``triton_decode.pdl_supported(dev)``."""
    if not (pdl and SAMPLER_PDL):
        return False
    from .triton_decode import pdl_supported

    return gdc_wait is not None and pdl_supported(dev)


def sample_fused(logits: Tensor, seen: Tensor, temperature: Tensor, top_k: Tensor, top_p_threshold: Tensor,
                 top_p_on: Tensor, penalty: Tensor, seed: Tensor, step: Tensor, vhash: Tensor) -> Tensor:
    """``sample(process_logits(logits, seen, ...).softmax(-1), seed, step, vhash)`` in ONE kernel.

    ``logits`` ``(B, V)`` float32 and ``seen`` ``(B, V)`` bool (unit stride over V, any row stride);
    ``temperature``, ``top_p_threshold``, ``penalty`` ``(B,)`` float32, ``top_k`` ``(B,)`` int64
    (clamped to ``[1, V]``), ``top_p_on`` ``(B,)`` bool, ``seed``, ``step`` ``(B,)`` int64, ``vhash``
    ``(V,)`` int64, ``V <= MAX_FUSED_V``. Returns ids ``(B,)`` int64. Differences from the torch path:
    top-p tie groups and threshold rounding, draw near-ties (module doc)."""
    return _sampler(logits, seen, temperature, top_k, top_p_threshold, top_p_on, penalty, seed, step, vhash,
                    scores=False)[0]


def sample_fused_scores(logits: Tensor, seen: Tensor, temperature: Tensor, top_k: Tensor, top_p_threshold: Tensor,
                        top_p_on: Tensor, penalty: Tensor, seed: Tensor, step: Tensor,
                        vhash: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`sample_fused` that also returns the kernel's processed scores ``(B, V)`` float32 (before the
    softmax; for tests: equal to ``process_logits``'s, ``-inf`` pattern included, module doc)."""
    ids, scores = _sampler(logits, seen, temperature, top_k, top_p_threshold, top_p_on, penalty, seed, step, vhash,
                           scores=True)
    return ids, scores


def sample_fused_step(logits: Tensor, seen: Tensor, temperature: Tensor, top_k: Tensor, top_p_threshold: Tensor,
                      top_p_on: Tensor, penalty: Tensor, seed: Tensor, step: Tensor, vhash: Tensor, tokens: Tensor,
                      sampled: Tensor, positions: Tensor, active: Tensor, pdl: bool = False) -> None:
    """:func:`sample_fused` plus the decode step's bookkeeping, in the same ONE kernel (no return value).

    Program ``b`` draws id ``t`` exactly as :func:`sample_fused` (from ``step[b]`` and ``seen[b, :]`` as they
    were on entry), then writes ``tokens[b] = sampled[b] = t``, ``seen[b, t] = True``,
    ``positions[b] += active[b]`` and ``step[b] += 1``: the torch ops

        tokens[:] = t; sampled[:] = t; seen[arange(B), t] = True; positions += active; step += 1

    (rows with ``active[b] = 0`` still draw, write their id and advance ``step``; only their position
    stays). ``tokens``, ``sampled``, ``positions``, ``active`` and ``step``: ``(B,)`` int64 with unit stride
    (views into the runner's state, updated in place); ``seen`` ``(B, V)`` bool, updated in place; the other
    arguments as :func:`sample_fused`. ``pdl``: launch with programmatic dependent launch right after the
    Triton step's head GEMV (pass ``FusedDecode.pdl_active``; effective only with :data:`SAMPLER_PDL` on
    CUDA sm_90+, :func:`sampler_pdl`); same results either way."""
    _sampler(logits, seen, temperature, top_k, top_p_threshold, top_p_on, penalty, seed, step, vhash, scores=False,
             state=dict(tokens=tokens, sampled=sampled, positions=positions, active=active), pdl=pdl)
