"""The one-kernel sampling draw (``t3.triton_sampling``) against ``t3.sampling.sample``, and the
one-kernel sampler ``sample_fused`` against ``sample(process_logits(...).softmax(-1))``, on CPU under
Triton's interpreter (same mechanism as ``test_t3_triton_decode.py``: the checks run in ONE child
process ``python <this file>`` with ``TRITON_INTERPRET=1``; each pytest test reports one check).

Exactness: the hash and the uniforms must be bit-for-bit equal; the draws may differ from torch's
only on float near-ties of ``p / E`` (the interpreter's log is NumPy's, torch's CPU log another
implementation), and a filtered (zero-probability) id must never be drawn. The fused sampler's
processed scores must equal ``process_logits``'s bit for bit, except top-p decisions of values whose
mass lies within rounding of the threshold (and tie groups at the threshold, tested on their own).
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.token_service.interpreter import child_results, run_checks

NEAR_TIE = 1e-6  # relative gap of two scores p / E below which either id is a valid draw
MASS_ROUNDING = 1e-5  # top-p: |mass(values <= v) - (1 - top_p)| below which either decision is valid


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


def _fused_rows(g: torch.Generator, V: int, B: int, kind: str) -> dict[str, torch.Tensor]:
    """Inputs of ``sample_fused`` for ``B`` rows with mixed per-row settings (upstream's on/off rules,
    as ``row_values``); ``kind``: the logits (``ties`` rows get top-p off: their semantics differ there)."""
    from token_service.t3.sampling import SamplingParams, row_values

    if kind == "ties":  # heavy ties (few distinct values, +0.0 and -0.0 among them) around the k-th
        logits = torch.randint(-3, 3, (B, V), generator=g).float()
        logits[(logits == 0) & (torch.rand(B, V, generator=g) < 0.5)] = -0.0
    else:
        logits = torch.randn(B, V, generator=g) * float(torch.tensor([0.5, 2.0, 8.0])[torch.randint(0, 3, (1,),
                                                                                                   generator=g)])
    if kind == "masked":  # -inf and huge negative logits (a row's later -inf survive top-k when k is large)
        logits[torch.rand(B, V, generator=g) < 0.3] = float("-inf")
        logits[torch.rand(B, V, generator=g) < 0.1] = -1e30
        logits[:, 0] = 1.0  # at least one finite value
    rows = []
    for _ in range(B):
        pick = lambda xs: xs[int(torch.randint(0, len(xs), (1,), generator=g))]  # noqa: E731
        params = SamplingParams(temperature=pick([1.0, 0.8]), top_k=pick([1, 50, 1000, V, 0]),
                                top_p=1.0 if kind == "ties" else pick([1.0, 0.95, 0.5]),
                                repetition_penalty=pick([1.0, 1.2]))
        rows.append(row_values(params, V))
    col = lambda name, dt: torch.tensor([r[name] for r in rows], dtype=dt)  # noqa: E731
    seen = torch.rand(B, V, generator=g) < 0.05
    if B > 1:
        seen[0] = False  # a row without seen ids
    return dict(logits=logits, seen=seen, temperature=col("temperature", torch.float32),
                top_k=col("top_k", torch.int64), top_p_threshold=col("top_p_threshold", torch.float32),
                top_p_on=col("top_p_on", torch.bool), penalty=col("penalty", torch.float32),
                seed=torch.randint(0, 2**32, (B,), generator=g), step=torch.randint(0, 2**33, (B,), generator=g))


def _top_p_rounding_only(x: dict[str, torch.Tensor], row: int, ids: torch.Tensor) -> bool:
    """Whether each id of ``ids`` (where the kernel and torch decided top-p differently) has a mass
    ``sum(p[s <= s_id])`` (float64, over the top-k survivors) within ``MASS_ROUNDING`` of ``1 - top_p``."""
    if not bool(x["top_p_on"][row]):
        return False
    s = (x["logits"][row] / x["temperature"][row]).double()
    kth = s.sort(descending=True).values[int(x["top_k"][row]) - 1]
    s = s.masked_fill(s < kth, float("-inf"))
    p = s.softmax(-1)
    mass = torch.stack([p[s <= s[i]].sum() for i in ids.tolist()])
    return bool(((mass - float(x["top_p_threshold"][row])).abs() <= MASS_ROUNDING).all())


def _fused_agreement(dev: torch.device, g: torch.Generator, sizes: tuple[tuple[int, int], ...],
                     max_batch: int = 3) -> tuple[int, int, int]:
    """``sample_fused`` against the torch path on ``dev`` for random rows of each ``(V, trials)`` in ``sizes``
    (B = 1 .. ``max_batch``; the kinds of :func:`_fused_rows`). Asserts the processed scores equal
    ``process_logits``'s bit for bit (``-inf`` pattern included) except top-p decisions within rounding of
    the threshold, and the id equals ``sample``'s on those scores or is a near-tie of it, never a filtered
    id. Returns ``(rows, near-tie draws, top-p boundary rows)``."""
    from token_service.t3.sampling import hashed_uniform, process_logits, sample, vocab_hash
    from token_service.t3.triton_sampling import sample_fused, sample_fused_scores

    n = near = boundary = 0
    names = ("logits", "seen", "temperature", "top_k", "top_p_threshold", "top_p_on", "penalty")
    for V, trials in sizes:
        vh = vocab_hash(V, dev)
        for trial in range(trials):
            B = 1 + trial % max_batch
            for kind in ("random", "masked", "ties"):
                x = _fused_rows(g, V, B, kind)
                xd = {k: t.to(dev) for k, t in x.items()}
                args = [xd[k] for k in names] + [xd["seed"], xd["step"], vh]
                got, scores = sample_fused_scores(*args)
                ref = process_logits(*[xd[k] for k in names])
                want = sample(ref.softmax(-1), xd["seed"], xd["step"], vh)
                assert got.dtype == torch.int64 and got.shape == (B,) and scores.shape == (B, V)
                assert torch.equal(sample_fused(*args), got), f"{kind} V={V}: sample_fused != sample_fused_scores"
                assert bool(torch.isfinite(scores.gather(1, got[:, None])).all()), f"{kind} V={V}: drew a filtered id"
                score = (ref.softmax(-1) / -torch.log(hashed_uniform(xd["seed"], xd["step"], vh))).cpu()
                got, want, scores, ref = got.cpu(), want.cpu(), scores.cpu(), ref.cpu()
                for r in range(B):
                    n += 1
                    diff = (scores[r].isfinite() != ref[r].isfinite()).nonzero()[:, 0]
                    where = f"{kind} V={V} trial {trial} row {r}"
                    if len(diff):  # only top-p decisions within rounding of the threshold
                        assert kind != "ties" and _top_p_rounding_only(x, r, diff), f"{where}: filters differ at {diff}"
                        boundary += 1
                        continue
                    assert torch.equal(scores[r], ref[r]), f"{where}: processed scores differ"
                    if got[r] != want[r]:
                        a, b = float(score[r, got[r]]), float(score[r, want[r]])
                        assert abs(a - b) <= NEAR_TIE * b, f"{where}: drew {int(got[r])}, torch {int(want[r])}"
                        near += 1
    return n, near, boundary


def check_fused_sampler_matches_torch():
    """Many random rows (B = 1, 2, 3; mixed per-row top-k / top-p / temperature / penalty; peaked and flat
    logits, -inf and huge negative logits, heavy ties at the k-th value; V from 7 to Turbo's 6563) agree
    with the torch path (:func:`_fused_agreement`); near-ties and top-p boundary rows are rare."""
    n, near, boundary = _fused_agreement(torch.device("cpu"), torch.Generator().manual_seed(4),
                                         ((7, 6), (64, 6), (1500, 6), (6563, 3)))
    assert near + boundary <= n // 20, f"{near} near-ties and {boundary} top-p boundary rows of {n}: too many"


def check_fused_sampler_tuple_reduction():
    """The GPU's top-p sums (one tuple reduction of 3 masked sums; the interpreter runs it element by
    element, so only on short rows here) agree with the torch path as the default path does."""
    from token_service.t3 import triton_sampling as ts

    ts._TUPLE_REDUCE = True
    try:
        n, near, boundary = _fused_agreement(torch.device("cpu"), torch.Generator().manual_seed(7), ((7, 3), (64, 3)))
    finally:
        ts._TUPLE_REDUCE = False
    assert near + boundary <= n // 10, f"{near} near-ties and {boundary} top-p boundary rows of {n}: too many"


def check_fused_top_p_tie_groups():
    """The documented top-p difference: a tie group straddling the threshold is kept (or dropped) whole,
    where HF's sorted cumsum splits it; every copy of a tied largest value is kept. (And top-k keeps
    -0.0 and +0.0 together, as torch's float comparison.)"""
    from token_service.t3.sampling import vocab_hash
    from token_service.t3.triton_sampling import sample_fused_scores

    V = 8
    vh = vocab_hash(V, "cpu")
    one = lambda v, dt: torch.tensor([v], dtype=dt)  # noqa: E731
    # values 2 (x1), 1 (x4), 0 (x3): p = 0.348, 0.128 each, 0.047 each; mass(<= 0) = 0.141, mass(<= 1) = 0.652.
    # HF's running sums split the 0-group at 0.1 (0.047, 0.094 | 0.141) and the 1-group at 0.3 and 0.5
    logits = torch.tensor([[1.0, 0.0, 2.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    p = logits.double().softmax(-1)[0]
    for thr in (0.1, 0.3, 0.5, 0.7):  # 0.7: the whole 1-group dropped, only the 2 left
        _, scores = sample_fused_scores(logits, torch.zeros(1, V, dtype=torch.bool), one(1.0, torch.float32),
                                        one(V, torch.int64), one(thr, torch.float32), one(True, torch.bool),
                                        one(1.0, torch.float32), one(1, torch.int64), one(0, torch.int64), vh)
        keep = torch.tensor([float(p[logits[0] <= v].sum()) > thr for v in logits[0]]) | (logits[0] == 2)
        assert torch.equal(scores[0].isfinite(), keep), (thr, scores)
    tied_max = torch.tensor([[3.0, 1.0, 3.0, 0.0, 3.0, 2.0, 1.0, 0.0]])  # top_p = 0: only the largest values
    _, scores = sample_fused_scores(tied_max, torch.zeros(1, V, dtype=torch.bool), one(1.0, torch.float32),
                                    one(V, torch.int64), one(1.0, torch.float32), one(True, torch.bool),
                                    one(1.0, torch.float32), one(1, torch.int64), one(0, torch.int64), vh)
    assert torch.equal(scores[0].isfinite(), tied_max[0] == 3.0), scores
    zeros = torch.tensor([[0.0, -0.0, 1.0, -0.0, -1.0, 0.0, -2.0, -0.0]])  # top-k: -0.0 ties with +0.0 (as torch)
    _, scores = sample_fused_scores(zeros, torch.zeros(1, V, dtype=torch.bool), one(1.0, torch.float32),
                                    one(3, torch.int64), one(0.0, torch.float32), one(False, torch.bool),
                                    one(1.0, torch.float32), one(1, torch.int64), one(0, torch.int64), vh)
    assert torch.equal(scores[0].isfinite(), zeros[0] >= 0), scores


def check_fused_edge_rows_and_bad_input():
    """A row of all -inf draws id 0 as torch (NaN softmax); top_k out of range is clamped to [1, V];
    wrong dtypes / shapes and a vocabulary over MAX_FUSED_V raise clear errors."""
    import re

    from token_service.t3.sampling import process_logits, sample, vocab_hash
    from token_service.t3.triton_sampling import MAX_FUSED_V, sample_fused

    V = 9
    vh = vocab_hash(V, "cpu")
    f32 = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    logits = torch.randn(2, V)
    logits[1] = float("-inf")
    args = [logits, torch.zeros(2, V, dtype=torch.bool), f32(1.0, 1.0), torch.tensor([V, V]), f32(0.05, 0.05),
            torch.tensor([True, True]), f32(1.2, 1.2)]
    seed, step = torch.tensor([3, 4]), torch.tensor([5, 6])
    got = sample_fused(*args, seed, step, vh)
    assert int(got[1]) == 0 and torch.equal(got, sample(process_logits(*args).softmax(-1), seed, step, vh)), got
    clamped = list(args)
    clamped[3] = torch.tensor([0, V + 5])  # as top_k = 1 and top_k = V
    want = list(args)
    want[3] = torch.tensor([1, V])
    assert torch.equal(sample_fused(*clamped, seed, step, vh), sample_fused(*want, seed, step, vh))
    big = MAX_FUSED_V + 1
    for bad, msg in (([logits.double()] + args[1:], "logits must be torch.float32"),
                     ([logits, args[1].float()] + args[2:], "seen must be torch.bool"),
                     (args[:3] + [args[3].int()] + args[4:], "top_k must be torch.int64"),
                     (args[:4] + [f32(0.05)] + args[5:], r"top_p_threshold must be torch.float32 \(2,\)"),
                     (args[:5] + [torch.tensor([1, 1])] + args[6:], "top_p_on must be torch.bool")):
        try:
            sample_fused(*bad, seed, step, vh)
        except ValueError as e:
            assert re.search(msg, str(e)), str(e)
        else:
            raise AssertionError(f"no error for {msg}")
    try:
        sample_fused(torch.zeros(1, big), torch.zeros(1, big, dtype=torch.bool), *[a[:1] for a in args[2:]],
                     seed[:1], step[:1], vocab_hash(big, "cpu"))
    except ValueError as e:
        assert "MAX_FUSED_V" in str(e), str(e)
    else:
        raise AssertionError("no error for a vocabulary over MAX_FUSED_V")


def _torch_bookkeeping(st: dict[str, torch.Tensor], rows_idx: torch.Tensor, a: int, b: int,
                       tok: torch.Tensor) -> None:
    """``ModelRunner._decode_body``'s torch bookkeeping after the sampler, on the state ``st`` (full-size tensors)."""
    st["tokens"][a:b] = tok
    st["sampled"][a:b] = tok
    st["seen"].index_put_((rows_idx[a:b], tok), torch.ones((), dtype=torch.bool, device=st["seen"].device))
    st["positions"][a:b] += st["active"][a:b]
    st["step"][a:b] += 1


def _fused_step_agreement(dev: torch.device, g: torch.Generator, sizes: tuple[tuple[int, int], ...]) -> None:
    """``sample_fused_step`` on rows ``a .. a+B-1`` of runner-like state on ``dev`` (views with an offset,
    B = 1, 2, 3, mixed per-row settings and mixed active rows, some drawn ids already seen), per ``(V, trials)``
    of ``sizes``: the same ids as ``sample_fused`` (read from ``step`` / ``seen`` as they were before the
    step), and tokens / sampled / seen (byte 1 for True) / positions / step equal to the torch bookkeeping;
    rows outside ``a .. a+B-1`` untouched."""
    from token_service.t3.sampling import vocab_hash
    from token_service.t3.triton_sampling import sample_fused, sample_fused_step

    names = ("logits", "seen", "temperature", "top_k", "top_p_threshold", "top_p_on", "penalty")
    slots = 5
    for V, trials in sizes:
        vh = vocab_hash(V, dev)
        for trial in range(trials):
            B = 1 + trial % 3
            a = trial % (slots - B + 1)
            x = {k: t.to(dev) for k, t in _fused_rows(g, V, B, ("random", "masked")[trial % 2]).items()}
            st = dict(tokens=torch.randint(0, V, (slots,), generator=g), sampled=torch.randint(0, V, (slots,),
                                                                                               generator=g),
                      seen=torch.rand(slots, V, generator=g) < 0.05, positions=torch.randint(0, 500, (slots,),
                                                                                           generator=g),
                      active=torch.randint(0, 2, (slots,), generator=g), step=torch.randint(0, 2**33, (slots,),
                                                                                          generator=g))
            st = {k: t.to(dev) for k, t in st.items()}
            st["seen"][a:a + B] = x["seen"]
            st["step"][a:a + B] = x["step"]
            if B > 1:  # both kinds of rows in every batch > 1
                st["active"][a], st["active"][a + 1] = 1, 0
            if trial % 3 == 2:
                x["penalty"][0] = 1.0  # so marking row a's id seen below leaves its draw as it is
            args = [x[k] for k in names[2:]] + [x["seed"]]
            ids = sample_fused(x["logits"], x["seen"], *args, x["step"], vh)
            if trial % 3 == 2:  # row a draws an id already seen (True stored over True)
                st["seen"][a, ids[0]] = True
                x["seen"] = st["seen"][a:a + B].clone()
                again = sample_fused(x["logits"], x["seen"], *args, x["step"], vh)
                assert torch.equal(again, ids), f"penalty 1.0 changed the draw: {again} != {ids}"
            want = {k: t.clone() for k, t in st.items()}
            _torch_bookkeeping(want, torch.arange(slots, device=dev), a, a + B, ids)
            got = {k: t.clone() for k, t in st.items()}
            sample_fused_step(x["logits"], got["seen"][a:a + B], *args, got["step"][a:a + B], vh,
                              got["tokens"][a:a + B], got["sampled"][a:a + B], got["positions"][a:a + B],
                              got["active"][a:a + B])
            where = f"V={V} trial {trial} B={B} rows {a}..{a + B - 1}"
            assert torch.equal(got["tokens"][a:a + B], ids), f"{where}: ids {got['tokens'][a:a + B]} != {ids}"
            for k in want:
                w, v = want[k], got[k]
                if k == "seen":
                    w, v = w.view(torch.uint8), v.view(torch.uint8)
                assert torch.equal(v, w), f"{where}: {k} differs from the torch bookkeeping"
            if B > 1:
                assert int(got["positions"][a + 1]) == int(st["positions"][a + 1]), f"{where}: inactive row moved"
                assert int(got["positions"][a]) == int(st["positions"][a]) + 1, f"{where}: active row did not move"


def check_fused_step_state_updates():
    """:func:`_fused_step_agreement` under the interpreter, V from 7 to Turbo's 6563."""
    _fused_step_agreement(torch.device("cpu"), torch.Generator().manual_seed(11), ((7, 6), (64, 6), (6563, 3)))


def check_fused_step_bad_input():
    """``sample_fused_step`` refuses state it could not update in place: wrong dtype (a bool ``active``),
    a strided view (a copy would take the writes), a wrong length."""
    import re

    from token_service.t3.sampling import vocab_hash
    from token_service.t3.triton_sampling import sample_fused_step

    V, B = 9, 2
    vh = vocab_hash(V, "cpu")
    f32 = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    args = [torch.randn(B, V), torch.zeros(B, V, dtype=torch.bool), f32(1.0, 1.0), torch.tensor([V, V]),
            f32(0.05, 0.05), torch.tensor([True, True]), f32(1.2, 1.2), torch.tensor([3, 4]), torch.tensor([5, 6]), vh]
    state = [torch.zeros(B, dtype=torch.long) for _ in range(4)]
    sample_fused_step(*args, *state)  # fine
    for i, bad, msg in ((3, torch.ones(B, dtype=torch.bool), "active must be int64"),
                        (0, torch.zeros(2 * B, dtype=torch.long)[::2], r"tokens must be int64 \(2,\) with unit stride"),
                        (2, torch.zeros(B + 1, dtype=torch.long), r"positions must be int64 \(2,\)")):
        st = list(state)
        st[i] = bad
        try:
            sample_fused_step(*args, *st)
        except ValueError as e:
            assert re.search(msg, str(e)), str(e)
        else:
            raise AssertionError(f"no error for {msg}")
    step = torch.zeros(2 * B, dtype=torch.long)[::2]
    try:
        sample_fused_step(*args[:8], step, vh, *state)
    except ValueError as e:
        assert re.search("step must be int64", str(e)), str(e)
    else:
        raise AssertionError("no error for a strided step")


def check_runner_seeded_sampling():
    """ModelRunner(kernels="triton") draws through the kernel in its Triton buckets and decodes the torch
    runner's tokens with upstream's default sampling (top_k=1000, top_p=0.95, temperature 0.8, penalty).
    Its decode steps sample AND update the row state in one kernel (``sample_fused_step``): after 4 steps
    of both sequences and 3 more with slot 0 deactivated (bucket 2 with an inactive row), every row's
    tokens / sampled / seen / positions / step / active equal the torch runner's; so do those of a Triton
    runner whose step variant is off (``sample_fused`` + the torch bookkeeping, as bench's ``fused`` draw)."""
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
    calls, fused_calls, step_calls = [], [], []
    real, real_fused, real_step = ts.sample_race, ts.sample_fused, ts.sample_fused_step
    ts.sample_race = lambda probs, *a: calls.append(probs.shape[0]) or real(probs, *a)
    ts.sample_fused = lambda logits, *a: fused_calls.append(logits.shape[0]) or real_fused(logits, *a)
    ts.sample_fused_step = lambda logits, *a, **k: step_calls.append(logits.shape[0]) or real_step(logits, *a, **k)
    try:
        out, state = {}, {}
        for kernels in ("torch", "triton", "triton-no-step"):
            r = ModelRunner(model, RunnerShape(4, L, (1, 2, 4), 64, cuda_graphs=False, kernels=kernels[:6]),
                            torch.device("cpu"), torch.float32)
            on = kernels != "torch"
            assert (r.fused_draw is not None) == (r.fused_sampler is not None) == on, r.fused_draw
            assert (r.fused_sampler_step is not None) == on, r.fused_sampler_step
            if kernels == "triton-no-step":
                r.fused_sampler_step = None
            seqs = []
            for i, text in enumerate(([5, 6, 7], [42, 43])):
                seq = Sequence(voice="default", text_ids=text, params=SamplingParams(seed=100 + i), seed=100 + i)
                seq.slot = i
                seqs.append(seq)
            toks = [r.prefill_many(seqs, [prefix] * 2)]
            for i in range(7):
                if i == 4:  # slot 0 finishes: bucket 2 keeps running with an inactive row 0
                    r.deactivate([0])
                    seqs = seqs[1:]
                toks.append(r.decode([(s.slot, s.position) for s in seqs])[:2])
                for s in seqs:
                    s.position += 1
            out[kernels] = toks
            state[kernels] = {k: getattr(r, k)[:4].clone() for k in
                              ("tokens", "sampled", "seen", "positions", "step", "active")}
            assert int(r.positions[1]) == seqs[0].position, (r.positions, seqs[0].position)
            assert int(r.positions[0]) == 0 and int(r.step[0]) == 1 + 7 and int(r.step[1]) == 1 + 7, r.step
            assert (r.fused is not None) == on, r.kernels_status  # its start-up check passed
            if kernels == "triton":
                after_triton = len(step_calls)
    finally:
        ts.sample_race, ts.sample_fused, ts.sample_fused_step = real, real_fused, real_step
    assert out["triton"] == out["torch"] == out["triton-no-step"], out
    for kernels in ("triton", "triton-no-step"):
        for k, t in state["torch"].items():
            assert torch.equal(state[kernels][k], t), f"{kernels}: {k} differs from the torch runner's"
    # the draw: its start-up checks only (flat rows, buckets 1 and 2, both Triton runners); the whole sampler
    # in one kernel: its start-up checks, then the decode steps of bucket 2: through the step variant (7),
    # or, with it off, through sample_fused + the torch bookkeeping (7)
    assert calls == [1, 2] * 2, (calls, fused_calls)
    assert after_triton == 2 + 7 and step_calls == [1, 2] + [2] * 7 + [1, 2], step_calls
    assert fused_calls == [1, 2] + [1, 2] + [2] * 7, fused_calls


def _tiny_triton_runner_with(name: str, make_fake):
    """A tiny CPU runner with the Triton step, built while ``triton_sampling.<name>`` is replaced by
    ``make_fake(real)`` (its start-up checks see the fake; the real function is back afterwards)."""
    from token_service.engine.model_runner import ModelRunner, RunnerShape
    from token_service.t3 import triton_sampling as ts
    from token_service.t3.config import T3Config
    from token_service.t3.model import T3Model

    real = getattr(ts, name)
    setattr(ts, name, make_fake(real))
    try:
        model = T3Model(T3Config.preset("tiny")).drop_unused().eval()
        return ModelRunner(model, RunnerShape(2, model.cfg.prefix_len + 64, (1, 2), 64, cuda_graphs=False,
                                              kernels="triton"), torch.device("cpu"), torch.float32)
    finally:
        setattr(ts, name, real)


def check_runner_drops_a_wrong_draw():
    """A draw that disagrees with ``sample`` at start-up is turned off (warning); the Triton step stays on."""
    r = _tiny_triton_runner_with("sample_race", lambda real: lambda *a: real(*a) + 1)
    assert r.fused is not None and r.kernels_status == "triton" and r.fused_draw is None
    assert r.fused_sampler is not None  # checked on its own


def check_runner_drops_a_wrong_sampler():
    """A one-kernel sampler that disagrees with the torch sampler at start-up is turned off (warning); the
    Triton step and the one-kernel draw stay on, and the Triton buckets sample with the draw again."""
    r = _tiny_triton_runner_with("sample_fused", lambda real: lambda *a: real(*a).flip(0) + 1)
    assert r.fused is not None and r.kernels_status == "triton" and r.fused_sampler is None
    assert r.fused_draw is not None


def check_runner_drops_a_wrong_sampler_step():
    """A step variant whose bookkeeping disagrees with the torch ops at start-up (here: positions moved for
    every row, inactive ones included) turns the one-kernel sampler off with it (warning); the Triton step
    and the one-kernel draw stay on, and the decode steps go back to the draw + the torch bookkeeping."""

    def make_wrong(real):
        def wrong(*a, **k):
            real(*a, **k)
            a[12].add_(1 - a[13])  # positions += 1 - active: now every row moved by one
        return wrong

    r = _tiny_triton_runner_with("sample_fused_step", make_wrong)
    assert r.fused is not None and r.kernels_status == "triton" and r.fused_draw is not None
    assert r.fused_sampler is None and r.fused_sampler_step is None


def check_sampler_pdl_is_off_under_the_interpreter():
    """``sample_fused_step(pdl=True)`` never launches with programmatic dependent launch under the interpreter
    (inline PTX; ``sampler_pdl`` is False for any device, switch on or off) and computes what ``pdl=False`` does."""
    from token_service.t3 import triton_sampling as ts

    assert ts._INTERPRET
    saved, ts.SAMPLER_PDL = ts.SAMPLER_PDL, True  # even with the switch on
    try:
        for dev in (torch.device("cpu"), torch.device("cuda", 0)):
            assert ts.sampler_pdl(True, dev) is False and ts.sampler_pdl(False, dev) is False
    finally:
        ts.SAMPLER_PDL = saved
    g = torch.Generator().manual_seed(21)
    V, B = 64, 3
    from token_service.t3.sampling import vocab_hash

    vh = vocab_hash(V, "cpu")
    logits = torch.randn(B, V, generator=g) * 3
    f32 = lambda v: torch.full((B,), v, dtype=torch.float32)  # noqa: E731
    rows = [f32(0.8), torch.full((B,), 20), f32(0.05), torch.ones(B, dtype=torch.bool), f32(1.2)]
    seed, step0 = torch.tensor([1, 2, 3]), torch.tensor([7, 8, 9])
    seen0 = torch.rand(B, V, generator=g) < 0.1
    results = []
    for pdl in (False, True):
        st = dict(seen=seen0.clone(), step=step0.clone(), tokens=torch.full((B,), -1), sampled=torch.full((B,), -1),
                  positions=torch.tensor([4, 5, 6]))
        ts.sample_fused_step(logits, st["seen"], *rows, seed, st["step"], vh, st["tokens"], st["sampled"],
                             st["positions"], torch.tensor([1, 0, 1]), pdl=pdl)
        results.append(st)
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def check_runner_passes_the_step_pdl_to_the_sampler():
    """The runner launches ``sample_fused_step`` with ``pdl = FusedDecode.pdl_active``: on while the (pretend
    Hopper) step keeps PDL, in the start-up check and the decode steps; off after the ladder turned the
    step's PDL off (here: the PDL step fails its start-up check)."""
    from token_service.engine.model_runner import ModelRunner, RunnerShape
    from token_service.t3 import triton_decode as td
    from token_service.t3 import triton_sampling as ts
    from token_service.t3.config import T3Config
    from token_service.t3.model import T3Model

    good_init, good_logits, real_step = td.FusedDecode.__init__, td.FusedDecode.logits, ts.sample_fused_step
    pdl_seen = []

    def init_pdl(self, *a, **k):  # a device that claims PDL support
        good_init(self, *a, **k)
        self.pdl = True

    def logits_plain(self, *a, **k):  # the interpreter cannot run gdc: compute the step without it
        saved, self.pdl = self.pdl, False
        try:
            return good_logits(self, *a, **k)
        finally:
            self.pdl = saved

    def logits_fail_with_pdl(self, *a, **k):
        if self.pdl_active:
            raise RuntimeError("launch with PDL refused")
        return good_logits(self, *a, **k)

    def step(*a, pdl=False, **k):
        pdl_seen.append(pdl)
        return real_step(*a, pdl=pdl, **k)

    model = T3Model(T3Config.preset("tiny")).drop_unused().eval()
    L = model.cfg.prefix_len + 64
    try:
        td.FusedDecode.__init__, ts.sample_fused_step = init_pdl, step
        for logits, want in ((logits_plain, True), (logits_fail_with_pdl, False)):
            td.FusedDecode.logits = logits
            pdl_seen.clear()
            r = ModelRunner(model, RunnerShape(2, L, (1, 2), 64, cuda_graphs=False, kernels="triton"),
                            torch.device("cpu"), torch.float32)
            assert r.fused is not None and r.fused.pdl_active == want, r.kernels_status
            assert r.fused_sampler_step is not None and pdl_seen == [want, want], pdl_seen  # start-up check, B = 1, 2
            r.tokens[:2], r.positions[:2], r.active[:2] = torch.tensor([3, 4]), L - 10, 1
            r._decode_body(r.groups[0], 2, L)
            assert pdl_seen == [want] * 3, pdl_seen
            if want:  # the ladder's first rung (as a failed capture takes it) turns the sampler's PDL off too
                r._fused_pdl_off(RuntimeError("capture failed"), "capturing")
                r._decode_body(r.groups[0], 2, L)
                assert pdl_seen == [True] * 3 + [False], pdl_seen
    finally:
        td.FusedDecode.__init__, td.FusedDecode.logits, ts.sample_fused_step = good_init, good_logits, real_step


CHECKS = {f.__name__: f for f in (check_hash_bits, check_uniform_bits, check_draws_match_sample,
                                  check_nan_row_and_bad_input, check_fused_sampler_matches_torch,
                                  check_fused_sampler_tuple_reduction, check_fused_top_p_tie_groups,
                                  check_fused_edge_rows_and_bad_input, check_fused_step_state_updates,
                                  check_fused_step_bad_input, check_runner_seeded_sampling,
                                  check_runner_drops_a_wrong_draw, check_runner_drops_a_wrong_sampler,
                                  check_runner_drops_a_wrong_sampler_step,
                                  check_sampler_pdl_is_off_under_the_interpreter,
                                  check_runner_passes_the_step_pdl_to_the_sampler)}


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


@pytest.mark.parametrize("state, pdl", [(False, False), (True, False), (True, True)],
                         ids=["sampler", "sampler+state", "sampler+state+pdl"])
def test_fused_sampler_compiles_for_h100_without_spills(tmp_path, state, pdl):
    """The one-kernel sampler compiles for sm_90 at Turbo's block (8192 lanes, no GPU needed): IEEE divisions,
    libdevice's log (no approximate one), logical shifts only, and ptxas keeps the row in registers; so does
    its ``STATE`` variant (``sample_fused_step``), whose ``seen`` store is one byte (``st.global.b8``), and
    that variant's PDL build: ONE ``griddepcontrol.wait`` ahead of every global load and store, no
    ``launch_dependents``; without PDL no griddepcontrol at all."""
    pytest.importorskip("triton")
    import subprocess
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from token_service.t3 import triton_sampling as ts

    if ts._INTERPRET:
        pytest.skip("this process runs the interpreter")
    ptrs = ("logits_ptr", "seen_ptr", "temp_ptr", "topk_ptr", "thr_ptr", "topp_on_ptr", "pen_ptr", "seed_ptr",
            "step_ptr", "vh_ptr", "out_ptr", "scores_ptr", "sampled_ptr", "pos_ptr", "active_ptr")
    types = ("*fp32", "*i1", "*fp32", "*i64", "*fp32", "*i1", "*fp32", "*i64", "*i64", "*i64", "*i64", "*fp32",
             "*i64", "*i64", "*i64")
    sig = dict(zip(ptrs, types), V="i32", stride_l="i32", stride_s="i32", BLOCK="constexpr",
               DIGIT_BITS="constexpr", PRECISE="constexpr", TUPLE_REDUCE="constexpr", SCORES="constexpr",
               STATE="constexpr", PDL="constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))}
    src = ASTSource(fn=ts._sampler_kernel, signature=sig, attrs=attrs,
                    constexprs=dict(BLOCK=ts.MAX_FUSED_V, DIGIT_BITS=ts.DIGIT_BITS, PRECISE=True, TUPLE_REDUCE=True,
                                    SCORES=False, STATE=state, PDL=pdl))
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": ts.FUSED_NUM_WARPS}).asm["ptx"]
    assert "shr.u32" in ptx and "shr.s32" not in ptx  # (64-bit shifts: the packed counts, never negative)
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx
    assert "lg2.approx" not in ptx
    assert ("st.global.b8" in ptx) == state, "the STATE variant stores seen[b, t] as one byte (and only it)"
    assert "griddepcontrol.launch_dependents" not in ptx
    assert ptx.count("griddepcontrol.wait") == int(pdl)
    if pdl:
        head = ptx[:ptx.index("griddepcontrol.wait")]
        assert "ld.global" not in head and "st.global" not in head, head
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("no ptxas in the Triton wheel")
    (tmp_path / "k.ptx").write_text(ptx)
    info = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(tmp_path / "k.ptx"), "-o",
                           str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
    assert "0 bytes spill stores, 0 bytes spill loads" in info, info


# ---------------------------------------------------------------------------------- CUDA (the lead's H100 run)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_sampler_equals_torch():
    """On the GPU the one-kernel sampler's processed scores equal ``process_logits``'s bit for bit (top-p
    rounding at the threshold aside) and its ids equal the torch path's (near-ties aside, at most 1 %)."""
    pytest.importorskip("triton")
    n, near, boundary = _fused_agreement(torch.device("cuda"), torch.Generator().manual_seed(5),
                                         ((7, 6), (300, 12), (6563, 24)), max_batch=4)
    assert near + boundary <= n // 100, f"{near} near-ties and {boundary} top-p boundary rows of {n}: too many"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_step_state_equals_torch_bookkeeping():
    """On the GPU the state variant (``sample_fused_step``: the one-byte ``seen`` store, the in-place ``step``
    increment after the draw read it) draws ``sample_fused``'s ids and updates the state as the torch ops."""
    pytest.importorskip("triton")
    _fused_step_agreement(torch.device("cuda"), torch.Generator().manual_seed(12), ((7, 6), (300, 12), (6563, 24)))


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
