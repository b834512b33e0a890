"""The one-kernel sampling draw (``t3.triton_sampling``) against ``t3.sampling.sample``, on CPU under
Triton's interpreter (same mechanism as ``test_t3_triton_decode.py``: the checks run in ONE child
process ``python <this file>`` with ``TRITON_INTERPRET=1``; each pytest test reports one check).

Exactness: the hash and the uniforms must be bit-for-bit equal; the draws may differ from torch's
only on float near-ties of ``p / E`` (the interpreter's log is NumPy's, torch's CPU log another
implementation), and a filtered (zero-probability) id must never be drawn.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.token_service.interpreter import child_results, run_checks

NEAR_TIE = 1e-6  # relative gap of two scores p / E below which either id is a valid draw


# ---------------------------------------------------------------------------------- interpreter checks
def check_hash_bits():
    """``_hash32`` equals ``tts_common.hashing.hash32`` on all 32 bits (edge values + random ones)."""
    from tts_common.hashing import MASK32, hash32

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, MASK32]),
                   torch.randint(0, 2**32, (4093,), generator=g, dtype=torch.int64)])
    from token_service.t3.triton_sampling import race_hash32

    out = race_hash32(x)
    assert out.dtype == torch.int64 and torch.equal(out, hash32(x)), (out != hash32(x)).nonzero()[:5]


def check_uniform_bits():
    """``race_uniform`` equals ``hashed_uniform`` bit for bit: seeds at the 32-bit edges, steps past 2**32."""
    from token_service.t3.sampling import hashed_uniform, vocab_hash
    from token_service.t3.triton_sampling import race_uniform

    g = torch.Generator().manual_seed(1)
    for V in (7, 6563):
        vh = vocab_hash(V, "cpu")
        seed = torch.cat([torch.tensor([0, 1, 2**31, 2**32 - 1]), torch.randint(0, 2**32, (4,), generator=g)])
        step = torch.cat([torch.tensor([0, 1, 2**32 + 3, 1000]), torch.randint(0, 2**40, (4,), generator=g)])
        got, want = race_uniform(seed, step, vh), hashed_uniform(seed, step, vh)
        assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"V={V}: uniforms differ"
        assert float(got.min()) > 0.0 and float(got.max()) < 1.0


def _cases(g: torch.Generator, V: int, B: int) -> list[tuple[str, torch.Tensor]]:
    """``(kind, probs (B, V))``: peaked, flat, and filtered (most ids at probability 0) rows."""
    logits = torch.randn(B, V, generator=g)
    keep = torch.rand(B, V, generator=g) < 0.05
    keep[:, 0] = True  # at least one survivor per row
    few = torch.zeros(B, V, dtype=torch.bool)
    few[:, torch.randint(0, V, (2,), generator=g)] = True
    return [("peaked", (logits * 8).softmax(-1)), ("soft", (logits * 0.5).softmax(-1)),
            ("flat", torch.full((B, V), 1.0 / V)),
            ("filtered", logits.masked_fill(~keep, float("-inf")).softmax(-1)),
            ("two-left", (logits * 0.1).masked_fill(~few, float("-inf")).softmax(-1)),
            ("one-left", logits.masked_fill(~few.cumsum(-1).eq(1) | ~few, float("-inf")).softmax(-1))]


def check_draws_match_sample():
    """Many random rows: the kernel's id is ``sample``'s (or a near-tie of it) and never a filtered id;
    a strided ``probs`` view (row stride > V) draws the same ids."""
    from token_service.t3.sampling import hashed_uniform, sample, vocab_hash
    from token_service.t3.triton_sampling import sample_race

    g = torch.Generator().manual_seed(2)
    n, near = 0, 0
    for V in (7, 6563):
        vh = vocab_hash(V, "cpu")
        for trial in range(6):
            B = 1 + trial % 3
            seed = torch.randint(0, 2**32, (B,), generator=g)
            step = torch.randint(0, 1200, (B,), generator=g)
            for kind, probs in _cases(g, V, B):
                got, want = sample_race(probs, seed, step, vh), sample(probs, seed, step, vh)
                assert got.dtype == torch.int64 and got.shape == (B,)
                assert bool((probs.gather(1, got[:, None]) > 0).all()), f"{kind} V={V}: drew a filtered id"
                score = probs / -torch.log(hashed_uniform(seed, step, vh))
                for r in range(B):
                    n += 1
                    if got[r] != want[r]:
                        a, b = float(score[r, got[r]]), float(score[r, want[r]])
                        assert abs(a - b) <= NEAR_TIE * b, f"{kind} V={V} row {r}: {int(got[r])} != {int(want[r])}"
                        near += 1
        wide = torch.zeros(3, V + 5)
        wide[:, :V] = _cases(g, V, 3)[0][1]
        seed, step = torch.tensor([5, 6, 7]), torch.tensor([0, 1, 2])
        assert torch.equal(sample_race(wide[:, :V], seed, step, vh), sample_race(wide[:, :V].contiguous(), seed, step, vh))
    assert near <= n // 20, f"{near} of {n} draws differ (near-ties only, but too many)"


def check_nan_row_and_bad_input():
    """A NaN row draws its first NaN id (as ``torch.argmax``); wrong dtypes/shapes raise clear errors."""
    from token_service.t3.sampling import sample, vocab_hash
    from token_service.t3.triton_sampling import sample_race

    vh = vocab_hash(7, "cpu")
    probs = torch.full((2, 7), 1 / 7)
    probs[1, 3:] = float("nan")
    seed, step = torch.tensor([1, 2]), torch.tensor([3, 4])
    got = sample_race(probs, seed, step, vh)
    assert int(got[1]) == 3 and torch.equal(got, sample(probs, seed, step, vh)), got
    vh = vocab_hash(6563, "cpu")  # NaNs in the same lane of later blocks and in another lane: the first wins
    probs = torch.full((1, 6563), 1 / 6563)
    probs[0, [100 + 2048, 100, 100 + 4096, 3000]] = float("nan")
    assert int(sample_race(probs, seed[:1], step[:1], vh)) == 100 == int(sample(probs, seed[:1], step[:1], vh))
    for bad, msg in (((probs.double(), seed, step, vh), "probs must be float32"),
                     ((probs, seed.int(), step, vh), "must be int64"),
                     ((probs[:, :6], seed, step, vh), r"probs must be float32 \(B, V\)"),
                     ((probs, seed, step[:1], vh), "seed and step must be")):
        try:
            sample_race(*bad)
        except (TypeError, ValueError) as e:
            import re

            assert re.search(msg, str(e)), str(e)
        else:
            raise AssertionError(f"no error for {msg}")


def check_runner_seeded_sampling():
    """ModelRunner(kernels="triton") draws through the kernel in its Triton buckets and decodes the torch
    runner's tokens with upstream's default sampling (top_k=1000, top_p=0.95, temperature 0.8, penalty)."""
    from token_service.engine.model_runner import ModelRunner, RunnerShape
    from token_service.engine.sequence import Sequence
    from token_service.t3 import triton_sampling as ts
    from token_service.t3.config import T3Config
    from token_service.t3.model import T3Model
    from token_service.t3.sampling import SamplingParams
    from token_service.t3.voice import VoiceConds, build_voice_prefix

    torch.manual_seed(0)
    model = T3Model(T3Config.preset("tiny")).drop_unused().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    cfg = model.cfg
    L = cfg.prefix_len + 64
    conds = VoiceConds(torch.randn(1, cfg.speaker_embed_size), torch.randint(0, 6561, (1, cfg.prompt_len)))
    prefix = build_voice_prefix(model, conds)
    calls = []
    real = ts.sample_race
    ts.sample_race = lambda probs, *a: calls.append(probs.shape[0]) or real(probs, *a)
    try:
        out = {}
        for kernels in ("torch", "triton"):
            r = ModelRunner(model, RunnerShape(4, L, (1, 2, 4), 64, cuda_graphs=False, kernels=kernels),
                            torch.device("cpu"), torch.float32)
            assert (r.fused_draw is not None) == (kernels == "triton"), r.fused_draw
            seqs = []
            for i, text in enumerate(([5, 6, 7], [42, 43])):
                seq = Sequence(voice="default", text_ids=text, params=SamplingParams(seed=100 + i), seed=100 + i)
                seq.slot = i
                seqs.append(seq)
            toks = [r.prefill_many(seqs, [prefix] * 2)]
            for _ in range(6):
                toks.append(r.decode([(s.slot, s.position) for s in seqs])[:2])
                for s in seqs:
                    s.position += 1
            out[kernels] = toks
    finally:
        ts.sample_race = real
    assert out["triton"] == out["torch"], out
    # start-up check (flat rows, buckets 1 and 2) + the 6 decode steps of bucket 2
    assert calls == [1, 2] + [2] * 6, calls


def check_runner_drops_a_wrong_draw():
    """A draw that disagrees with ``sample`` at start-up is turned off (warning); the Triton step stays on."""
    from token_service.engine.model_runner import ModelRunner, RunnerShape
    from token_service.t3 import triton_sampling as ts
    from token_service.t3.config import T3Config
    from token_service.t3.model import T3Model

    real = ts.sample_race
    ts.sample_race = lambda *a: real(*a) + 1
    try:
        model = T3Model(T3Config.preset("tiny")).drop_unused().eval()
        r = ModelRunner(model, RunnerShape(2, model.cfg.prefix_len + 64, (1, 2), 64, cuda_graphs=False,
                                           kernels="triton"), torch.device("cpu"), torch.float32)
    finally:
        ts.sample_race = real
    assert r.fused is not None and r.kernels_status == "triton" and r.fused_draw is None


CHECKS = {f.__name__: f for f in (check_hash_bits, check_uniform_bits, check_draws_match_sample,
                                  check_nan_row_and_bad_input, check_runner_seeded_sampling,
                                  check_runner_drops_a_wrong_draw)}


# ---------------------------------------------------------------------------------- tests (parent process)
@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    pytest.importorskip("triton")
    return child_results(__file__, timeout_s=300)


@pytest.mark.parametrize("name", list(CHECKS))
def test_sampling_kernel_under_the_interpreter(interpreter_results, name):
    err = interpreter_results[name]
    assert err is None, f"{name} failed in the interpreter child:\n{err}"


def test_without_triton_on_cpu_the_runner_keeps_the_torch_draw():
    """CPU without the interpreter: no Triton step, so no Triton draw either; ``sample_race`` refuses CPU."""
    from token_service.engine.model_runner import ModelRunner, RunnerShape
    from token_service.t3.config import T3Config
    from token_service.t3.model import T3Model
    from token_service.t3.sampling import vocab_hash

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this process runs the interpreter")
    model = T3Model(T3Config.preset("tiny")).drop_unused().eval()
    r = ModelRunner(model, RunnerShape(2, model.cfg.prefix_len + 64, (1, 2), 64, cuda_graphs=False, kernels="triton"),
                    torch.device("cpu"), torch.float32)
    assert r.fused is None and r.fused_draw is None
    pytest.importorskip("triton")
    from token_service.t3.triton_sampling import sample_race

    with pytest.raises(RuntimeError, match="needs CUDA"):
        sample_race(torch.full((1, 7), 1 / 7), torch.tensor([1]), torch.tensor([0]), vocab_hash(7, "cpu"))


def test_kernel_compiles_for_h100_with_logical_shifts():
    """The draw kernel compiles for sm_90 (no GPU needed); its PTX has only logical 32-bit shifts, an
    IEEE division and no approximate log (libdevice ``logf``, as torch's CUDA ``log``)."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from token_service.t3 import triton_sampling as ts

    if ts._INTERPRET:
        pytest.skip("this process runs the interpreter")
    sig = dict(probs_ptr="*fp32", seed_ptr="*i64", step_ptr="*i64", vh_ptr="*i64", out_ptr="*i64", V="i32",
               stride_p="i32", BLOCK="constexpr", PRECISE="constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    src = ASTSource(fn=ts._race_kernel, signature=sig, constexprs=dict(BLOCK=ts.BLOCK_V, PRECISE=True), attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": ts.NUM_WARPS}).asm["ptx"]
    assert "shr.u32" in ptx and "shr.s32" not in ptx and "shr.s64" not in ptx
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx
    assert "lg2.approx" not in ptx


# ---------------------------------------------------------------------------------- CUDA (the lead's H100 run)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_torch_sample():
    """On the GPU the uniforms are bit-exact and the draws equal torch's ``sample`` (libdevice logf and
    IEEE division: expected equal; near-ties tolerated, at most 1 %), never a filtered id."""
    from token_service.t3.sampling import hashed_uniform, sample, vocab_hash
    from token_service.t3.triton_sampling import race_uniform, sample_race

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    n = exact = 0
    for V in (7, 6563):
        vh = vocab_hash(V, dev)
        for trial in range(20):
            B = 1 + trial % 8
            seed = torch.randint(0, 2**32, (B,), generator=g).to(dev)
            step = torch.randint(0, 2**33, (B,), generator=g).to(dev)
            u = race_uniform(seed, step, vh)
            assert torch.equal(u.view(torch.int32), hashed_uniform(seed, step, vh).view(torch.int32))
            for kind, probs in _cases(g, V, B):
                probs = probs.to(dev)
                got, want = sample_race(probs, seed, step, vh), sample(probs, seed, step, vh)
                assert bool((probs.gather(1, got[:, None]) > 0).all()), kind
                score = probs / -torch.log(u)
                a, b = score.gather(1, got[:, None])[:, 0], score.gather(1, want[:, None])[:, 0]
                assert bool(((a - b).abs() <= NEAR_TIE * b).all()), (kind, got, want)
                n += B
                exact += int((got == want).sum())
    assert n - exact <= n // 100, f"{n - exact} of {n} GPU draws differ from torch's (near-ties, but too many)"


if __name__ == "__main__":
    run_checks(CHECKS)
