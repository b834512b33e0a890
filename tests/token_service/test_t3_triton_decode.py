"""The Triton decode step (``t3.triton_decode``) against plain torch, on CPU under Triton's interpreter.

The interpreter must be switched on (``TRITON_INTERPRET=1``) before Triton is imported, and it must
not leak into other tests of the same pytest process (a GPU run would then interpret the real
kernels). So the kernel checks run in ONE child process (``python <this file>``) with the variable
set; each check is a plain function below, and each pytest test reports one check's outcome.

Tolerances (fp32, tiny preset): measured max |logits difference| ~3e-6 at logits of magnitude ~7
(different summation order: split attention, fused LayerNorm); we allow 1e-4 absolute + 1e-5
relative, and 1e-5 on single kernels.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.token_service.interpreter import child_results, run_checks

LOGITS_TOL = dict(atol=1e-4, rtol=1e-5)
KERNEL_TOL = dict(atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- helpers
def _tiny_model(seed: int = 0):
    """Tiny T3 with weights large enough that every part matters (LayerNorm gains ~1 ± 0.1)."""
    from token_service.t3.config import T3Config
    from token_service.t3.model import T3Model

    torch.manual_seed(seed)
    model = T3Model(T3Config.preset("tiny")).drop_unused().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(1.0, 0.1)
            elif p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return model


def _random_cache(cfg, n_slots: int, max_len: int):
    from token_service.t3.model import KVCache

    cache = KVCache(cfg, n_slots, max_len)
    for t in cache.k + cache.v:
        t.normal_()
    return cache


def _copy_cache(src):
    import copy

    dst = copy.copy(src)
    dst.k, dst.v = [t.clone() for t in src.k], [t.clone() for t in src.v]
    return dst


GPU_BLOCKS = dict(MAX_BLOCK_N=16, MIN_PROGRAMS=264, MERGE_MIN_PROGRAMS=128, TILE_ELEMS=4096)


def _gpu_blocks(td) -> dict:
    """Switch ``td`` to the GPU's block sizes (the interpreter defaults to few large programs); returns the old ones."""
    old = {k: getattr(td, k) for k in GPU_BLOCKS}
    for k, v in GPU_BLOCKS.items():
        setattr(td, k, v)
    return old


# ---------------------------------------------------------------------------------- interpreter checks
def check_gemv():
    """Every prologue/epilogue of the GEMV kernel, odd shapes, B = 1 and 3; then with the GPU's tile
    size (two weight rows per program, BLOCK_K below K with a ragged last chunk)."""
    from token_service.t3 import triton_decode as td

    torch.manual_seed(1)
    for B in (1, 3):
        for N, K in ((100, 72), (6563, 64), (17, 200)):
            _check_gemv_shape(td, B, N, K)
    old = _gpu_blocks(td)
    prefetch_default = td.GEMV_PREFETCH
    td.MIN_PROGRAMS = 16  # (a small N still gets several narrow programs)
    try:
        for prefetch in (True, False):  # the software-pipelined weight loop and the plain one (default)
            td.GEMV_PREFETCH = prefetch
            for B in (1, 3):
                assert td.gemv_blocks(B, 40, 3000) == ((1, 2, 2048) if B == 1 else (4, 2, 512))
                _check_gemv_shape(td, B, 40, 3000)
            td.TILE_ELEMS = 256  # many K chunks (16 wide at B = 3), ragged last one
            _check_gemv_shape(td, 3, 40, 200)
            td.TILE_ELEMS = GPU_BLOCKS["TILE_ELEMS"]
    finally:
        td.GEMV_PREFETCH = prefetch_default
        for k, v in old.items():
            setattr(td, k, v)


def _check_gemv_shape(td, B: int, N: int, K: int) -> None:
    import torch.nn.functional as F

    x = torch.randn(B, K)
    w = torch.randn(N, K) / K ** 0.5
    bias = torch.randn(N)
    g, be = torch.randn(K) * 0.1 + 1, torch.randn(K) * 0.1
    res = torch.randn(B, N)
    y = td.gemv(x, w, bias, torch.empty(B, N))
    torch.testing.assert_close(y, x @ w.T + bias, **KERNEL_TOL)
    ln = F.layer_norm(x, (K,), g, be, 1e-5)
    y = td.gemv(x, w, bias, torch.empty(B, N), ln=(g, be, 1e-5))
    torch.testing.assert_close(y, ln @ w.T + bias, **KERNEL_TOL)
    y = td.gemv(x, w, bias, torch.empty(B, N), ln=(g, be, 1e-5), gelu=True)
    torch.testing.assert_close(y, F.gelu(ln @ w.T + bias, approximate="tanh"), **KERNEL_TOL)
    out = res.clone()
    td.gemv(x, w, bias, out, residual=True)
    torch.testing.assert_close(out, res + x @ w.T + bias, **KERNEL_TOL)


def check_embed():
    from token_service.t3 import triton_decode as td

    emb, wpe = torch.randn(50, 40), torch.randn(30, 40)
    tok, pos = torch.tensor([3, 49, 0]), torch.tensor([29, 0, 7])
    out = td.embed(tok, pos, emb, wpe, torch.empty(3, 40))
    torch.testing.assert_close(out, emb[tok] + wpe[pos], **KERNEL_TOL)


def check_embed_in_the_ln_gemv():
    """PRO_EMBED_LN (``gemv(..., embed=...)``) equals the embedding kernel followed by the LayerNorm GEMV bit for
    bit, and leaves ``x`` (NaN before: nothing else writes it) equal to the embedding kernel's, B = 1, 2, 3;
    with the interpreter's one large program and with the GPU's many narrow ones (only program 0 stores ``x``)."""
    from token_service.t3 import triton_decode as td

    torch.manual_seed(4)
    C, N = 96, 200
    emb, wpe = torch.randn(50, C), torch.randn(30, C)
    w, bias = torch.randn(N, C) / C ** 0.5, torch.randn(N)
    ln = (torch.randn(C) * 0.1 + 1, torch.randn(C) * 0.1, 1e-5)
    for gpu in (False, True):
        old = _gpu_blocks(td) if gpu else {}
        try:
            if gpu:
                td.MIN_PROGRAMS, td.TILE_ELEMS = 16, 256  # several programs, several K chunks
                assert td.gemv_blocks(3, N, C)[1] < N
            for B in (1, 2, 3):
                tok, pos = torch.randint(0, 50, (B,)), torch.randint(0, 30, (B,))
                x_ref = td.embed(tok, pos, emb, wpe, torch.empty(B, C))
                want = td.gemv(x_ref, w, bias, torch.empty(B, N), ln=ln)
                x = torch.full((B, C), float("nan"))
                got = td.gemv(x, w, bias, torch.empty(B, N), ln=ln, embed=(tok, pos, emb, wpe))
                assert torch.equal(got, want), (gpu, B, float((got - want).abs().max()))
                assert torch.equal(x, x_ref), (gpu, B)
        finally:
            for k, v in old.items():
                setattr(td, k, v)


def check_fuse_embed_step_is_bit_identical():
    """FusedDecode with FUSE_EMBED on (embedding in the first GEMV's prologue) equals it off (the embedding
    kernel) bit for bit: logits, the residual stream ``x`` after the step and the K/V caches, B = 1, 2, 3
    over 3 consecutive steps; both within tolerance of ``decode_step``."""
    from token_service.t3 import triton_decode as td
    from token_service.t3.generate import decode_step

    saved = td.FUSE_EMBED
    model, ref_model = _tiny_model(), _tiny_model()
    fd = td.FusedDecode(model)
    C = model.cfg.n_embd
    try:
        for B, positions in ((1, [40]), (2, [3, 101]), (3, [0, 77, 250])):
            c0 = _random_cache(model.cfg, 4, 300)
            caches = {f: _copy_cache(c0) for f in (True, False)}
            c_ref = _copy_cache(c0)
            tok, pos = torch.randint(0, 6561, (B,)), torch.tensor(positions)
            with torch.inference_mode():
                for _ in range(3):
                    out = {}
                    for fuse in (True, False):
                        td.FUSE_EMBED = fuse
                        x = torch.full((B, C), float("nan"))
                        out[fuse] = fd.logits(caches[fuse], B, tok, pos, residual=x), x
                    assert torch.equal(out[True][0], out[False][0]), float((out[True][0] - out[False][0]).abs().max())
                    assert torch.equal(out[True][1], out[False][1]) and bool(torch.isfinite(out[True][1]).all())
                    ref = decode_step(ref_model, c_ref, B, tok, pos, 300)
                    torch.testing.assert_close(out[True][0], ref, **LOGITS_TOL)
                    tok, pos = ref.argmax(-1), pos + 1
            for a, b in zip(caches[True].k + caches[True].v, caches[False].k + caches[False].v):
                assert torch.equal(a, b)
    finally:
        td.FUSE_EMBED = saved


def check_attention():
    """Split attention + K/V write, merged by the out-projection prologue (identity weight): rows at
    positions 0, 5, 150 and 77 (0: only the new token; 150 spans three splits of a short last block)."""
    import torch.nn.functional as F

    from token_service.t3 import triton_decode as td
    from token_service.t3.config import T3Config

    torch.manual_seed(2)
    cfg = T3Config.preset("tiny")
    C, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
    tile = td.TILE_ELEMS
    saved = td.BLOCK_L, td.ATTN_BALANCED, td.ATTN_SMALL_BLOCK
    cases = [(p, t, False) for p, t in (([150], tile), ([0, 5, 150, 77], tile), ([0, 5, 150, 77], 256))]
    cases += [(p, tile, True) for p in ([150], [0, 1, 7, 9, 130])]  # balanced splits: shares not whole tiles
    cases += [([0, 5, 150, 77, 40], tile, "small")]  # BLOCK_L 32, small tiles of 16 for shares of <= 16
    for positions, td_tile, balanced in cases:
        td.TILE_ELEMS = td_tile  # 256: the merge runs in 16-wide K chunks (a quarter head each)
        td.ATTN_BALANCED = bool(balanced)
        td.BLOCK_L, td.ATTN_SMALL_BLOCK = (32, 16) if balanced == "small" else (64, 0)
        B = len(positions)
        pos = torch.tensor(positions)
        cache = _random_cache(cfg, B + 1, 200)
        want_k, want_v = cache.k[0].clone(), cache.v[0].clone()
        qkv = torch.randn(B, 3 * C)
        q, k, v = qkv.view(B, 3, H, D).unbind(1)
        for b, p in enumerate(positions):
            want_k[b, :, p], want_v[b, :, p] = k[b], v[b]
        part = (torch.empty(B, H, td.KV_SPLITS), torch.empty(B, H, td.KV_SPLITS), torch.empty(B, H, td.KV_SPLITS, D))
        td.attention(qkv, cache.k[0], cache.v[0], pos, H, part)
        torch.testing.assert_close(cache.k[0], want_k, atol=0, rtol=0)  # only (b, :, positions[b]) written
        torch.testing.assert_close(cache.v[0], want_v, atol=0, rtol=0)
        y = td.gemv(qkv, torch.eye(C), torch.zeros(C), torch.zeros(B, C), merge=part, residual=True)
        for b, p in enumerate(positions):
            ref = F.scaled_dot_product_attention(q[b][:, None], want_k[b, :, :p + 1], want_v[b, :, :p + 1])
            torch.testing.assert_close(y[b].view(H, D), ref[:, 0], **KERNEL_TOL)
    td.TILE_ELEMS, (td.BLOCK_L, td.ATTN_BALANCED, td.ATTN_SMALL_BLOCK) = tile, saved


def check_fused_step():
    """FusedDecode logits (and K/V writes) equal ``decode_step``'s over consecutive steps, B = 1 and 3,
    with a small BLOCK_L so the positions span several blocks and splits."""
    from token_service.t3 import triton_decode as td
    from token_service.t3.generate import decode_step

    saved = td.BLOCK_L, td.ATTN_BALANCED, td.ATTN_SMALL_BLOCK
    model = _tiny_model()
    ref_model = _tiny_model()  # untouched layout: the reference path
    fd = td.FusedDecode(model)
    for B, positions, balanced in ((1, [233], False), (3, [3, 101, 250], False), (3, [3, 101, 250], True),
                                   (3, [3, 101, 250], "small")):
        td.ATTN_BALANCED = bool(balanced)
        td.BLOCK_L, td.ATTN_SMALL_BLOCK = (32, 16) if balanced == "small" else (16, 0)
        c_ref = _random_cache(model.cfg, 4, 300)
        c_got = _copy_cache(c_ref)
        tok, pos = torch.randint(0, 6561, (B,)), torch.tensor(positions)
        with torch.inference_mode():
            for _ in range(3):
                ref = decode_step(ref_model, c_ref, B, tok, pos, 300)
                got = fd.logits(c_got, B, tok, pos)
                assert got.dtype == torch.float32 and got.shape == ref.shape
                torch.testing.assert_close(got, ref, **LOGITS_TOL)
                assert torch.equal(got.argmax(-1), ref.argmax(-1))
                tok, pos = ref.argmax(-1), pos + 1
        for a, b in zip(c_ref.k + c_ref.v, c_got.k + c_got.v):
            torch.testing.assert_close(b, a, **KERNEL_TOL)
    td.BLOCK_L, td.ATTN_BALANCED, td.ATTN_SMALL_BLOCK = saved


def check_runner_greedy():
    """ModelRunner(kernels="triton") decodes the torch runner's greedy tokens; graph keys: one per
    batch bucket <= MAX_BATCH (KV bucket = max_seq_len), per-KV-bucket keys above."""
    from token_service.engine.model_runner import ModelRunner, RunnerShape
    from token_service.engine.sequence import Sequence
    from token_service.t3 import triton_decode as td
    from token_service.t3.sampling import SamplingParams
    from token_service.t3.voice import VoiceConds, build_voice_prefix

    model = _tiny_model()
    cfg = model.cfg
    L = cfg.prefix_len + 100
    torch.manual_seed(3)
    conds = VoiceConds(torch.randn(1, cfg.speaker_embed_size), torch.randint(0, 6561, (1, cfg.prompt_len)))
    prefix = build_voice_prefix(model, conds)
    out = {}
    for kernels in ("torch", "triton"):
        r = ModelRunner(model, RunnerShape(12, L, (1, 2, 4, 8), 256 if kernels == "torch" else 64, cuda_graphs=False,
                                           first_group=0, kernels=kernels, fused_max_batch=8), torch.device("cpu"), torch.float32)
        assert r.kernels_status == kernels, r.kernels_status
        if kernels == "triton":
            g = r.groups[0]
            assert g.batch_sizes == (1, 2, 4, 8, 12)
            assert len(r._kv_buckets()) == 8 and r._kv_buckets()[-1] == L
            assert r.graph_keys(g) == [(1, L), (2, L), (4, L), (8, L)] + [(12, kv) for kv in r._kv_buckets()]
            assert r.decode_key(3, 500, g) == (4, L) and r.decode_key(9, 130, g) == (12, 192)
        seqs = []
        for i, text in enumerate(([5, 6, 7], list(range(100, 117)), [42])):
            seq = Sequence(voice="default", text_ids=text, params=SamplingParams(top_k=1, seed=i), seed=i)
            seq.slot = i
            seqs.append(seq)
        toks = [r.prefill_many(seqs, [prefix] * 3)]
        for _ in range(4):
            running = [(s.slot, s.position) for s in seqs]
            toks.append(r.decode(running)[:3])
            for s in seqs:
                s.position += 1
        out[kernels] = toks
    assert out["triton"] == out["torch"], out
    assert td.MAX_BATCH == 8

    # a Triton step that computes wrong logits is caught at start-up: the runner falls back to torch
    good = td.FusedDecode.logits
    td.FusedDecode.logits = lambda self, *a, **k: good(self, *a, **k) * 1.5
    try:
        r = ModelRunner(model, RunnerShape(4, L, (1, 2, 4), 256, cuda_graphs=False, kernels="triton"),
                        torch.device("cpu"), torch.float32)
    finally:
        td.FusedDecode.logits = good
    assert r.fused is None and r.kernels_status.startswith("fallback: running the Triton decode step"), r.kernels_status
    assert "relative L2 error" in r.kernels_status and r.graph_keys() == [(n, kv) for n in (1, 2, 4) for kv in (256, L)]


def check_pdl_is_off_under_the_interpreter():
    """Programmatic dependent launch never reaches the interpreter (inline PTX): the step's ``pdl`` is
    off even with the module switch on, and an off launch passes neither gdc constexprs nor ``launch_pdl``."""
    from token_service.t3 import triton_decode as td

    assert td._INTERPRET and td.PDL
    assert not td.pdl_supported(torch.device("cpu")) and not td.pdl_supported(torch.device("cuda", 0))
    fd = td.FusedDecode(_tiny_model())
    assert fd.pdl is False and fd.pdl_active is False
    assert td._pdl_launch(False) == (dict(PDL=False, TRIGGER=0), {})
    old = td.PDL_TRIGGER
    try:
        for name, code in (("none", 0), ("start", 1), ("end", 2)):
            td.PDL_TRIGGER = name
            assert td._pdl_launch(True) == (dict(PDL=True, TRIGGER=code), dict(launch_pdl=True))
        td.PDL_TRIGGER = "middle"
        try:
            td._pdl_launch(True)
            raise AssertionError("a bad PDL_TRIGGER was accepted")
        except ValueError as e:
            assert "PDL_TRIGGER must be one of none, start, end" in str(e)
    finally:
        td.PDL_TRIGGER = old


def check_runner_pdl_ladder():
    """The runner's start-up ladder with the real (interpreted) Triton step on a pretend-PDL device:
    a PDL step that fails turns PDL off and keeps the (checked) Triton step; a step that also fails
    without PDL falls back to torch."""
    from token_service.engine.model_runner import ModelRunner, RunnerShape
    from token_service.t3 import triton_decode as td

    model = _tiny_model()
    L = model.cfg.prefix_len + 100
    good_init, good_logits = td.FusedDecode.__init__, td.FusedDecode.logits

    def init_pdl(self, *a, **k):  # a device that claims PDL support
        good_init(self, *a, **k)
        self.pdl = True

    def logits_fail_with_pdl(self, *a, **k):  # a PDL launch that the driver refuses
        if self.pdl_active:
            raise RuntimeError("launch with PDL refused")
        return good_logits(self, *a, **k)

    def shape():
        return RunnerShape(4, L, (1, 2, 4), 64, cuda_graphs=False, kernels="triton", fused_max_batch=2)

    try:
        td.FusedDecode.__init__ = init_pdl
        td.FusedDecode.logits = logits_fail_with_pdl
        r = ModelRunner(model, shape(), torch.device("cpu"), torch.float32)
        assert r.fused is not None and r.fused.pdl is False, r.kernels_status
        assert r.kernels_status.startswith("triton (pdl off: running the Triton decode step for slots 0..3 failed: "
                                           "RuntimeError: launch with PDL refused"), r.kernels_status
        assert r.graph_keys() == [(1, L), (2, L)] + [(4, kv) for kv in r._kv_buckets()]
        td.FusedDecode.logits = lambda self, *a, **k: good_logits(self, *a, **k) * 1.5  # wrong with or without
        r = ModelRunner(model, shape(), torch.device("cpu"), torch.float32)
        assert r.fused is None and r.kernels_status.startswith("fallback: running the Triton decode step"), \
            r.kernels_status
        assert "relative L2 error" in r.kernels_status
    finally:
        td.FusedDecode.__init__, td.FusedDecode.logits = good_init, good_logits


CHECKS = {f.__name__: f for f in (check_gemv, check_embed, check_embed_in_the_ln_gemv,
                                  check_fuse_embed_step_is_bit_identical, check_attention, check_fused_step, check_runner_greedy,
                                  check_pdl_is_off_under_the_interpreter, check_runner_pdl_ladder)}


# ---------------------------------------------------------------------------------- tests (parent process)
@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    pytest.importorskip("triton")
    return child_results(__file__, timeout_s=600)


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_kernels_under_the_interpreter(interpreter_results, name):
    err = interpreter_results[name]
    assert err is None, f"{name} failed in the interpreter child:\n{err}"


def test_relayout_keeps_the_torch_path():
    """``relayout_conv1d``: same parameter values/shapes, (out, in) contiguous storage, no extra copy
    kept, and the torch decode step's logits within fp32 noise of the original layout."""
    from token_service.t3.generate import decode_step
    from token_service.t3.triton_decode import GPT2_LINEARS, out_major, relayout_conv1d

    model, ref_model = _tiny_model(), _tiny_model()
    relayout_conv1d(model)
    relayout_conv1d(model)  # idempotent
    for blk, ref_blk in zip(model.tfmr.h, ref_model.tfmr.h):
        for name in GPT2_LINEARS:
            w, w_ref = blk.get_submodule(name).weight, ref_blk.get_submodule(name).weight
            assert w.shape == w_ref.shape and torch.equal(w, w_ref)
            assert not w.is_contiguous() and out_major(blk.get_submodule(name)).is_contiguous()
            assert w.untyped_storage().nbytes() == w.numel() * w.element_size()
    assert set(model.state_dict()) == set(ref_model.state_dict())
    cache = _random_cache(model.cfg, 2, 300)
    cache_ref = _copy_cache(cache)
    tok, pos = torch.tensor([5, 900]), torch.tensor([10, 250])
    with torch.inference_mode():
        got = decode_step(model, cache, 2, tok, pos, 300)
        want = decode_step(ref_model, cache_ref, 2, tok, pos, 300)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_without_the_interpreter_on_cpu_the_runner_falls_back(caplog):
    """CPU without TRITON_INTERPRET: the Triton step cannot run; the runner says so and uses torch."""
    import logging

    from token_service.engine.model_runner import ModelRunner, RunnerShape

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this process runs the interpreter")
    with caplog.at_level(logging.WARNING, logger="token_service.engine.model_runner"):
        r = ModelRunner(_tiny_model(), RunnerShape(4, 500, (1, 2, 4), 256, cuda_graphs=False, kernels="triton"),
                        torch.device("cpu"), torch.float32)
    assert r.fused is None and r.kernels_status.startswith("fallback: setting up the Triton decode kernels")
    assert any("Triton decode kernels disabled" in rec.getMessage() for rec in caplog.records)
    assert r.graph_keys() == [(n, kv) for n in (1, 2, 4) for kv in (256, 500)]
    with pytest.raises(ValueError, match="kernels must be one of torch, triton"):
        ModelRunner(_tiny_model(), RunnerShape(4, 500, (1, 2, 4), 256, cuda_graphs=False, kernels="cuda"),
                    torch.device("cpu"), torch.float32)


class _FakeFusedDecode:
    """Stands in for ``FusedDecode`` on a CPU without the interpreter: the torch step's logits, a
    ``pdl`` flag like the real one's (on: a pretend Hopper)."""

    def __init__(self, model, max_batch: int = 8):
        self.model, self.max_batch, self.pdl = model, max_batch, True

    @property
    def pdl_active(self) -> bool:
        return self.pdl

    def logits(self, cache, n_rows, tokens, positions, length=None):
        from token_service.t3.generate import decode_step

        return decode_step(self.model, cache, n_rows, tokens, positions)


@pytest.mark.parametrize("fails, status, captures", [
    ("pdl", "triton (pdl off: capturing the decode step of slots 4..", ["pdl", "triton"]),
    ("triton", "fallback: capturing the decode step of slots 4..", ["pdl", "triton", "torch"]),
    ("never", "triton+pdl", ["pdl"]),
])
def test_graph_capture_ladder_pdl_then_triton_then_torch(monkeypatch, fails, status, captures):
    """A capture that fails with PDL is retried with the Triton step without PDL (checked again
    first), then with the torch step; the status says which one runs. Capture is faked (no GPU here):
    it fails while the step at the failing rung or above is on."""
    from token_service.engine import model_runner as mr
    from token_service.t3 import triton_decode as td

    monkeypatch.setattr(td, "FusedDecode", _FakeFusedDecode)
    model = _tiny_model()
    L = model.cfg.prefix_len + 40
    r = mr.ModelRunner(model, mr.RunnerShape(8, L, (1, 2, 4), 64, cuda_graphs=False, first_group=4,
                                             kernels="triton"), torch.device("cpu"), torch.float32)
    assert r.kernels_status == "triton+pdl" and r.fused.pdl
    seen, checks = [], []

    def capture(g):
        rung = "torch" if r.fused is None else "pdl" if r.fused.pdl_active else "triton"
        seen.append(rung)
        g.graphs[(1, 0)] = rung  # a graph that a failure must not leave behind
        if (fails, rung) in (("pdl", "pdl"), ("triton", "pdl"), ("triton", "triton")):
            raise RuntimeError(f"capture failed at {rung}")
        g.graphs[(1, 0)] = rung + " graph"

    good_check = r._check_fused_step
    monkeypatch.setattr(r, "capture_graphs", capture)
    monkeypatch.setattr(r, "_check_fused_step", lambda g: (checks.append(r.fused.pdl_active), good_check(g))[1])
    r.use_graphs = True
    g = r.ensure_group(1)
    assert seen == captures and r.kernels_status.startswith(status), (seen, r.kernels_status)
    assert g.graphs == {(1, 0): captures[-1] + " graph"}
    assert checks == ([True] if fails == "never" else [True, False])  # the non-PDL step is checked before capture
    assert (r.fused is None) == (fails == "triton")
    if r.fused is not None:
        assert r.fused.pdl == (fails == "never")
    assert not bool(r.positions.any()) and not bool(r.tokens.any())  # the warm-up rows are reset


def test_service_setting_reaches_the_engine_config(monkeypatch, demo_tiny_dir):
    """``--t3-kernels`` / ``TTS_T3_KERNELS`` (default torch) end up in ``EngineConfig.kernels``."""
    import token_service.engine as engine_pkg
    from token_service.config import TokenServiceConfig
    from token_service.engine_loader import load_engine
    from tts_common.config import ConfigError, load_config

    seen = []

    class Recorder:
        def __init__(self, config):
            seen.append(config)
            self.device, self.dtype, self.compile_status, self.kernels_status = "cpu", "float32", "off", config.kernels

        def voices(self):
            return ["default"]

    monkeypatch.setattr(engine_pkg, "LLMEngine", Recorder)
    base = dict(model_dir=str(demo_tiny_dir))
    for argv, env, want in (([], {}, "auto"), (["--t3-kernels", "triton"], {}, "triton"),
                            ([], {"TTS_T3_KERNELS": "triton"}, "triton"),
                            (["--t3-kernels", "torch"], {"TTS_T3_KERNELS": "triton"}, "torch")):
        cfg = load_config(TokenServiceConfig, argv, env, **base)
        load_engine(cfg)
        assert cfg.t3_kernels == want and seen[-1].kernels == want
    with pytest.raises(ConfigError, match="t3-kernels"):
        load_config(TokenServiceConfig, ["--t3-kernels", "cuda"], {}, **base)


def test_auto_kernels_are_triton_on_cuda_only():
    from token_service.engine.llm_engine import resolve_kernels

    assert resolve_kernels("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_kernels("auto", torch.device("cpu")) == "torch"
    assert resolve_kernels("torch", torch.device("cuda")) == "torch"
    assert resolve_kernels("triton", torch.device("cpu")) == "triton"  # asked for: the runner decides (fallback)


def _compile_for_h100(fn, signature: dict, constexprs: dict, sizes: dict, num_warps: int):
    """Ahead-of-time compile ``fn`` for sm_90 (no GPU needed: Triton's own LLVM and ptxas), with the
    16-divisibility hints a real launch gets (pointers; ints in ``sizes`` divisible by 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
             if ty.startswith("*") or (ty == "i32" and sizes.get(name, 1) % 16 == 0)}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def test_kernels_compile_for_h100():
    """Every kernel variant the Turbo step launches (B = 1 and 8) compiles to sm_90 with the module's
    block sizes (the interpreter checks semantics only; this catches what only the compiler rejects)."""
    pytest.importorskip("triton")
    from token_service.t3 import triton_decode as td

    if td._INTERPRET:
        pytest.skip("this process runs the interpreter")
    C, H, D, V = 1024, 16, 64, 6563
    ptr = {"fp32": "*fp32", "bf16": "*bf16"}
    names = ("x_ptr", "lnw_ptr", "lnb_ptr", "pm_ptr", "pl_ptr", "pacc_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr",
             "tok_ptr", "pos_ptr", "emb_ptr", "wpe_ptr")
    pdl_variants = [dict(PDL=False, TRIGGER=0, PREFETCH=False), dict(PDL=False, TRIGGER=0, PREFETCH=True),
                    dict(PDL=True, TRIGGER=2, PREFETCH=True), dict(PDL=True, TRIGGER=1, PREFETCH=False)]
    shapes = ((3 * C, C, td.PRO_LN, False, False, "fp32", "bf16"), (C, C, td.PRO_MERGE, False, True, "fp32", "fp32"),
              (4 * C, C, td.PRO_LN, True, False, "fp32", "bf16"), (C, 4 * C, td.PRO_NONE, False, True, "bf16", "fp32"),
              (V, C, td.PRO_LN, False, False, "fp32", "fp32"),
              (3 * C, C, td.PRO_EMBED_LN, False, False, "fp32", "bf16"))
    # every shape with the default loop (prefetch, PDL off); the c_fc GEMV and the first layer's embedding +
    # ln_1 + c_attn GEMV (FUSE_EMBED) at B = 1 with the other variants
    cases = [(B, *shape, pdl_variants[1]) for B in (1, 8) for shape in shapes]
    cases += [(1, *shapes[i], v) for i in (2, 5) for j, v in enumerate(pdl_variants) if j != 1]
    for B, N, K, pro, gelu, res, x_dt, out_dt, pdl in cases:
        merge, ln = pro == td.PRO_MERGE, pro in (td.PRO_LN, td.PRO_EMBED_LN)
        bp, bn, bk = td.gemv_blocks(B, N, K, td.KV_SPLITS if merge else 0)
        types = [ptr[x_dt], "*bf16" if ln else ptr[x_dt], "*bf16" if ln else ptr[x_dt]]
        types += ["*fp32"] * 3 if merge else [ptr[x_dt]] * 3
        types += ["*bf16", "*bf16", ptr[out_dt], ptr[out_dt]]
        types += ["*i64", "*i64", "*bf16", "*bf16"] if pro == td.PRO_EMBED_LN else [ptr[x_dt]] * 4
        sig = dict(zip(names, types), B="i32", N="i32", K="i32", eps="fp32")
        consts = dict(BP=bp, BLOCK_N=bn, BLOCK_K=bk, PROLOGUE=pro, GELU=gelu, RESIDUAL=res,
                      HEAD_DIM=D if merge else 1, SPLITS=td.KV_SPLITS if merge else 1,
                      BLOCK_ROW=td._pow2(K) if ln else 1, **pdl)
        if B == 1:  # a launch specialises an int argument equal to 1 as a constant
            consts["B"] = 1
        sig.update({k: "constexpr" for k in consts})
        k = _compile_for_h100(td._gemv_kernel, sig, consts, dict(N=N, K=K), td.GEMV_WARPS)
        ptx = k.asm["ptx"]
        assert "ld.global.v4" in ptx, f"GEMV {N}x{K} B={B}: no 16-byte weight loads"
        _check_pdl_ptx(ptx, pdl, prefetch=pdl["PREFETCH"])
        if pro == td.PRO_EMBED_LN:  # program 0's store of x (fp32) besides the qkv (bf16) stores
            assert "st.global.v4.b32" in ptx or "st.global.v4.f32" in ptx or "st.global.b32" in ptx, ptx
    for pdl in (pdl_variants[0], pdl_variants[2], dict(PDL=True, TRIGGER=0)):
        pdl = {k: v for k, v in pdl.items() if k != "PREFETCH"}
        sig = dict(qkv_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", pos_ptr="*i64", pm_ptr="*fp32", pl_ptr="*fp32",
                   pacc_ptr="*fp32", C="i32", H="i32", stride_b="i32", stride_h="i32", scale="fp32",
                   D="constexpr", SPLITS="constexpr", BLOCK="constexpr", SMALL="constexpr", BALANCED="constexpr",
                   PDL="constexpr", TRIGGER="constexpr")
        k = _compile_for_h100(td._attn_kernel, sig, dict(D=D, SPLITS=td.KV_SPLITS, BLOCK=td.BLOCK_L,
                                                         SMALL=td.ATTN_SMALL_BLOCK, BALANCED=td.ATTN_BALANCED, **pdl),
                              dict(C=C, H=H, stride_b=8 * H * 2048 * D, stride_h=2048 * D), td.ATTN_WARPS)
        assert "ld.global.v4" in k.asm["ptx"]
        _check_pdl_ptx(k.asm["ptx"], pdl, prefetch=False)
        sig = dict(tok_ptr="*i64", pos_ptr="*i64", emb_ptr="*bf16", wpe_ptr="*bf16", x_ptr="*fp32", C="i32",
                   BLOCK_C="constexpr", PDL="constexpr", TRIGGER="constexpr")
        k = _compile_for_h100(td._embed_kernel, sig, dict(BLOCK_C=C, **pdl), dict(C=C), 4)
        _check_pdl_ptx(k.asm["ptx"], pdl, prefetch=False)


def _check_pdl_ptx(ptx: str, pdl: dict, prefetch: bool) -> None:
    """PDL off: no griddepcontrol at all. On: one wait, ahead of every store; global loads before it
    only with ``prefetch`` (the GEMV's first weight tile(s) and bias, 5 at the default blocks); the
    trigger where asked, after the wait."""
    waits, triggers = ptx.count("griddepcontrol.wait"), ptx.count("griddepcontrol.launch_dependents")
    if not pdl["PDL"]:
        assert waits == triggers == 0, ptx
        return
    assert waits == 1 and triggers == (pdl["TRIGGER"] != 0), (waits, triggers)
    head = ptx[:ptx.index("griddepcontrol.wait")]
    assert "st.global" not in head and (head.count("ld.global") >= 2 if prefetch else "ld.global" not in head), head
    if pdl["TRIGGER"]:
        assert ptx.index("griddepcontrol.launch_dependents") > ptx.index("griddepcontrol.wait")


# ---------------------------------------------------------------------------------- CUDA (the lead's H100 run)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_turbo_bf16_logits_and_greedy_tokens(demo_turbo_dir):
    """Full-size Turbo (demo weights), bf16 on the GPU, a real voice prefix + text prefilled: with the
    fp32 model's greedy tokens fed to every path (teacher forcing), the Triton step's logits are as
    close to fp32 as the torch bf16 step's, and its argmax agrees with fp32 about as often."""
    from token_service.t3 import triton_decode as td
    from token_service.t3.generate import decode_step, prefill
    from token_service.t3.loader import load_t3, load_voice_conds_all
    from token_service.t3.model import KVCache, prefill_attention_backends
    from token_service.t3.voice import build_voice_prefix

    dev = torch.device("cuda")
    models = {name: load_t3(demo_turbo_dir).drop_unused().to(dev, dt).eval()
              for name, dt in (("fp32", torch.float32), ("torch", torch.bfloat16), ("triton", torch.bfloat16))}
    fused = td.FusedDecode(models["triton"])
    cfg = models["fp32"].cfg
    conds = load_voice_conds_all(demo_turbo_dir)["default"]
    texts = [list(range(300, 340)), [11, 12, 13], list(range(2000, 2090))]
    B, steps, L = len(texts), 40, 640
    caches, tok = {}, None
    with torch.inference_mode(), prefill_attention_backends(dev):  # (no cuDNN plan per prefill length)
        for name, m in models.items():
            prefix = build_voice_prefix(m, conds)
            caches[name] = KVCache(cfg, B, L, device=dev, dtype=m.speech_head.weight.dtype)
            first = torch.stack([prefill(m, caches[name], b, prefix, torch.tensor(t, device=dev))
                                 for b, t in enumerate(texts)])
            if name == "fp32":
                tok = first.argmax(-1)
        pos = torch.tensor([cfg.prefix_len + len(t) + 1 for t in texts], device=dev)
        err = {"torch": 0.0, "triton": 0.0}
        agree = {"torch": 0, "triton": 0}
        for _ in range(steps):
            ref = decode_step(models["fp32"], caches["fp32"], B, tok, pos, L)
            got = {"torch": decode_step(models["torch"], caches["torch"], B, tok, pos, L),
                   "triton": fused.logits(caches["triton"], B, tok, pos)}
            for name, lg in got.items():
                assert lg.dtype == torch.float32 and lg.shape == ref.shape and bool(torch.isfinite(lg).all())
                err[name] = max(err[name], float((lg - ref).abs().max()))
                agree[name] += int((lg.argmax(-1) == ref.argmax(-1)).sum())
            tok, pos = ref.argmax(-1), pos + 1
    print(f"max |logits - fp32|: {err}; argmax agreement with fp32 of {B * steps}: {agree}")
    assert err["triton"] <= 1.5 * err["torch"] + 1e-2, err
    assert agree["triton"] >= agree["torch"] - max(2, B * steps // 20), agree


@cuda
def test_cuda_engine_graphs_replay_the_triton_step(demo_tiny_dir):
    """fp32 engine with kernels="triton" and CUDA graphs: one graph per Triton batch bucket (1, 2; not
    per KV bucket), per KV bucket above; the same tokens as the eager torch engine (greedy and seeded)."""
    from tests.token_service.helpers import cuda_engine, run_all
    from token_service.engine import SamplingParams

    def engine(**kw):
        return cuda_engine(demo_tiny_dir, dtype="float32", **kw)

    requests = [([1 + i, 50 + i, 7] * (1 + i % 2), SamplingParams(seed=i, max_new_tokens=30, top_k=1 if i % 2 else 1000))
                for i in range(6)]
    fused = engine(cuda_graphs=True, kernels="triton")
    eager = engine(cuda_graphs=False, kernels="torch")
    try:
        assert fused.kernels_status == _triton_status(), fused.kernels_status
        assert sorted(fused.runner.graphs) == sorted([(0, 1, 640), (0, 2, 640)]
                                                     + [(0, n, kv) for n in (4, 8) for kv in (256, 512, 640)])
        assert run_all(fused, requests) == run_all(eager, requests)
    finally:
        fused.close()
        eager.close()



def _triton_status() -> str:
    """The runner's ``kernels_status`` for a working Triton step on this GPU (with PDL on sm_90+)."""
    from token_service.t3 import triton_decode as td

    return "triton+pdl" if td.PDL and td.pdl_supported(torch.device("cuda")) else "triton"


@cuda
def test_cuda_pdl_step_equals_the_plain_step():
    """sm_90+: the step launched with programmatic dependent launch (every trigger placement) computes
    the plain step's logits and K/V writes bit for bit, eagerly and replayed from a CUDA graph
    (20 replays: a missing wait would show as a race); the prefetching GEMV loop agrees with the plain
    loop up to bf16 rounding."""
    from token_service.t3 import triton_decode as td

    dev = torch.device("cuda")
    if not td.pdl_supported(dev):
        pytest.skip("programmatic dependent launch needs compute capability >= 9")
    model = _tiny_model().to(dev, torch.bfloat16)
    fd = td.FusedDecode(model)
    assert fd.pdl and fd.pdl_active
    cfg = model.cfg
    base = _random_cache(cfg, 2, 600)
    base.k, base.v = [t.to(dev, torch.bfloat16) for t in base.k], [t.to(dev, torch.bfloat16) for t in base.v]
    tok, pos = torch.tensor([17, 4000], device=dev), torch.tensor([450, 77], device=dev)
    saved = {k: getattr(td, k) for k in ("PDL", "PDL_TRIGGER", "GEMV_PREFETCH")}

    def run(B, graph=False, **consts):
        for k, v in consts.items():
            setattr(td, k, v)
        cache = _copy_cache(base)
        fn = lambda: fd.logits(cache, B, tok[:B], pos[:B])  # noqa: E731 - same position: same writes each call
        if not graph:
            out = fn().clone()
        else:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                res = fn()
            outs = []
            for _ in range(20):
                g.replay()
                outs.append(res.clone())
            torch.cuda.synchronize()
            assert all(torch.equal(o, outs[0]) for o in outs)
            out = outs[0]
        torch.cuda.synchronize()
        return out, cache

    try:
        with torch.inference_mode():
            for B in (1, 2):
                want, want_cache = run(B, PDL=False, GEMV_PREFETCH=True)
                for trigger in ("end", "start", "none"):
                    for graph in (False, True):
                        got, got_cache = run(B, graph, PDL=True, PDL_TRIGGER=trigger, GEMV_PREFETCH=True)
                        assert torch.equal(got, want), (B, trigger, graph, float((got - want).abs().max()))
                        for a, b in zip(want_cache.k + want_cache.v, got_cache.k + got_cache.v):
                            assert torch.equal(a, b)
                plain, _ = run(B, True, PDL=True, PDL_TRIGGER="end", GEMV_PREFETCH=False)
                torch.testing.assert_close(plain, want, atol=5e-2, rtol=2e-2)
    finally:
        for k, v in saved.items():
            setattr(td, k, v)


@cuda
def test_cuda_fuse_embed_and_sampler_pdl_are_bit_identical():
    """On the GPU (bf16 tiny model) the decode step FusedDecode.logits + ``sample_fused_step`` (as the runner
    launches it: ``pdl = FusedDecode.pdl_active``) gives the same logits, residual stream, K/V caches and row
    state (tokens, sampled, seen, positions, step) bit for bit with ``FUSE_EMBED`` on or off and
    ``SAMPLER_PDL`` on or off (PDL matters on sm_90+ only), over 4 consecutive steps, eagerly and replayed
    from a CUDA graph; the graph replays equal the eager steps."""
    from token_service.t3 import triton_decode as td
    from token_service.t3 import triton_sampling as ts
    from token_service.t3.sampling import SamplingParams, row_values, vocab_hash

    dev = torch.device("cuda")
    model = _tiny_model().to(dev, torch.bfloat16)
    fd = td.FusedDecode(model)
    cfg = model.cfg
    C, V, B = cfg.n_embd, cfg.speech_vocab_size, 2
    base = _random_cache(cfg, B, 600)
    base.k, base.v = [t.to(dev, torch.bfloat16) for t in base.k], [t.to(dev, torch.bfloat16) for t in base.v]
    gen = torch.Generator().manual_seed(9)
    p = row_values(SamplingParams(), V)
    rows = [torch.full((B,), p[k], dtype=dt, device=dev) for k, dt in
            (("temperature", torch.float32), ("top_k", torch.long), ("top_p_threshold", torch.float32),
             ("top_p_on", torch.bool), ("penalty", torch.float32))]
    seed = torch.randint(0, 1 << 32, (B,), generator=gen).to(dev)
    active = torch.ones(B, dtype=torch.long, device=dev)
    vh = vocab_hash(V, dev)
    state0 = dict(tokens=torch.tensor([17, 4000], device=dev), sampled=torch.zeros(B, dtype=torch.long, device=dev),
                  positions=torch.tensor([450, 77], device=dev), step=torch.tensor([3, 900], device=dev),
                  seen=(torch.rand(B, V, generator=gen) < 0.02).to(dev))
    saved = (td.FUSE_EMBED, ts.SAMPLER_PDL)

    def run(fuse: bool, sampler_pdl: bool, graph: bool):
        td.FUSE_EMBED, ts.SAMPLER_PDL = fuse, sampler_pdl
        cache = _copy_cache(base)
        st = {k: v.clone() for k, v in state0.items()}
        x = torch.empty(B, C, dtype=torch.float32, device=dev)

        def step():
            lg = fd.logits(cache, B, st["tokens"], st["positions"], residual=x)
            ts.sample_fused_step(lg, st["seen"], *rows, seed, st["step"], vh, st["tokens"], st["sampled"],
                                 st["positions"], active, pdl=fd.pdl_active)
            return lg

        if not graph:
            for _ in range(4):
                lg = step()
        else:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # compile / warm up, then put the state back (in place: same addresses)
                step()
            torch.cuda.current_stream().wait_stream(s)
            for k, v in st.items():
                v.copy_(state0[k])
            for a, b in zip(cache.k + cache.v, base.k + base.v):
                a.copy_(b)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                lg = step()
            for _ in range(4):
                g.replay()
        torch.cuda.synchronize()
        return dict(logits=lg.clone(), x=x.clone(), **st), cache

    try:
        with torch.inference_mode():
            want, want_cache = run(False, False, False)
            assert bool(torch.isfinite(want["logits"]).all()) and int((want["step"] - state0["step"]).min()) == 4
            for fuse in (False, True):
                for sampler_pdl in (False, True):
                    for graph in (False, True):
                        got, got_cache = run(fuse, sampler_pdl, graph)
                        for k, w in want.items():
                            assert torch.equal(got[k], w), (fuse, sampler_pdl, graph, k)
                        for a, b in zip(want_cache.k + want_cache.v, got_cache.k + got_cache.v):
                            assert torch.equal(a, b), (fuse, sampler_pdl, graph)
    finally:
        td.FUSE_EMBED, ts.SAMPLER_PDL = saved


if __name__ == "__main__":
    run_checks(CHECKS)
