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
    td.MIN_PROGRAMS = 16  # (a small N still gets several narrow programs)
    try:
        for B in (1, 3):
            assert td.gemv_blocks(B, 40, 3000) == ((1, 2, 2048) if B == 1 else (4, 2, 512))
            _check_gemv_shape(td, B, 40, 3000)
    finally:
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
    for positions, td_tile in (([150], tile), ([0, 5, 150, 77], tile), ([0, 5, 150, 77], 256)):
        td.TILE_ELEMS = td_tile  # 256: the merge runs in 16-wide K chunks (a quarter head each)
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
    td.TILE_ELEMS = tile


def check_fused_step():
    """FusedDecode logits (and K/V writes) equal ``decode_step``'s over consecutive steps, B = 1 and 3,
    with a small BLOCK_L so the positions span several blocks and splits."""
    from token_service.t3 import triton_decode as td
    from token_service.t3.generate import decode_step

    td.BLOCK_L = 16
    model = _tiny_model()
    ref_model = _tiny_model()  # untouched layout: the reference path
    fd = td.FusedDecode(model)
    for B, positions in ((1, [233]), (3, [3, 101, 250])):
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
    td.BLOCK_L = 64


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


CHECKS = {f.__name__: f for f in (check_gemv, check_embed, check_attention, check_fused_step, check_runner_greedy)}


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
    names = ("x_ptr", "lnw_ptr", "lnb_ptr", "pm_ptr", "pl_ptr", "pacc_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr")
    for B in (1, 8):
        for N, K, pro, gelu, res, x_dt, out_dt in ((3 * C, C, td.PRO_LN, False, False, "fp32", "bf16"),
                                                    (C, C, td.PRO_MERGE, False, True, "fp32", "fp32"),
                                                    (4 * C, C, td.PRO_LN, True, False, "fp32", "bf16"),
                                                    (C, 4 * C, td.PRO_NONE, False, True, "bf16", "fp32"),
                                                    (V, C, td.PRO_LN, False, False, "fp32", "fp32")):
            merge = pro == td.PRO_MERGE
            bp, bn, bk = td.gemv_blocks(B, N, K, td.KV_SPLITS if merge else 0)
            types = [ptr[x_dt], "*bf16" if pro == td.PRO_LN else ptr[x_dt], "*bf16" if pro == td.PRO_LN else ptr[x_dt]]
            types += ["*fp32"] * 3 if merge else [ptr[x_dt]] * 3
            types += ["*bf16", "*bf16", ptr[out_dt], ptr[out_dt]]
            sig = dict(zip(names, types), B="i32", N="i32", K="i32", eps="fp32")
            consts = dict(BP=bp, BLOCK_N=bn, BLOCK_K=bk, PROLOGUE=pro, GELU=gelu, RESIDUAL=res,
                          HEAD_DIM=D if merge else 1, SPLITS=td.KV_SPLITS if merge else 1,
                          BLOCK_ROW=td._pow2(K) if pro == td.PRO_LN else 1)
            if B == 1:  # a launch specialises an int argument equal to 1 as a constant
                consts["B"] = 1
            sig.update({k: "constexpr" for k in consts})
            k = _compile_for_h100(td._gemv_kernel, sig, consts, dict(N=N, K=K), td.GEMV_WARPS)
            assert "ld.global.v4" in k.asm["ptx"], f"GEMV {N}x{K} B={B}: no 16-byte weight loads"
    sig = dict(qkv_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", pos_ptr="*i64", pm_ptr="*fp32", pl_ptr="*fp32",
               pacc_ptr="*fp32", C="i32", H="i32", stride_b="i32", stride_h="i32", scale="fp32",
               D="constexpr", SPLITS="constexpr", BLOCK="constexpr")
    k = _compile_for_h100(td._attn_kernel, sig, dict(D=D, SPLITS=td.KV_SPLITS, BLOCK=td.BLOCK_L),
                          dict(C=C, H=H, stride_b=8 * H * 2048 * D, stride_h=2048 * D), td.ATTN_WARPS)
    assert "ld.global.v4" in k.asm["ptx"]
    sig = dict(tok_ptr="*i64", pos_ptr="*i64", emb_ptr="*bf16", wpe_ptr="*bf16", x_ptr="*fp32", C="i32",
               BLOCK_C="constexpr")
    _compile_for_h100(td._embed_kernel, sig, dict(BLOCK_C=C), dict(C=C), 4)


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
        assert fused.kernels_status == "triton", fused.kernels_status
        assert sorted(fused.runner.graphs) == sorted([(0, 1, 640), (0, 2, 640)]
                                                     + [(0, n, kv) for n in (4, 8) for kv in (256, 512, 640)])
        assert run_all(fused, requests) == run_all(eager, requests)
    finally:
        fused.close()
        eager.close()


if __name__ == "__main__":
    run_checks(CHECKS)
