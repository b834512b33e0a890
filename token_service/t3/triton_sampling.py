"""T3's hashed sampling draw as ONE Triton kernel (opt-in with the Triton decode step; issue 6).

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

# One program per row runs on one SM: enough warps to hide the latency of the integer/log chains.
# First guesses for an H100, not yet measured (bench/tune_triton_decode.py --engine-step times the step).
BLOCK_V = 2048  # ids per loop iteration (Turbo's 6563 speech ids: 4 iterations, 4 ids per thread each)
NUM_WARPS = 16

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

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
    def _row_key(seed_ptr, step_ptr, b):
        """Per-row key ``hash32(hash32(seed ^ 0x9E3779B9) ^ (step mod 2**32))`` (uint32 scalar)."""
        seed = tl.load(seed_ptr + b).to(tl.uint32)
        step = tl.load(step_ptr + b).to(tl.uint32)
        return _hash32(_hash32(seed ^ 0x9E3779B9) ^ step)

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
