"""Validate a TensorRT-LLM T3 checkpoint without TensorRT-LLM.

``python -m export.validate --checkpoint_dir DIR --prompt_table FILE [--model_dir M --voice V]``

An **independent loader** reads ``config.json`` + ``rank0.safetensors`` and runs them the way
TensorRT-LLM's ``GPTForCausalLM`` documents its tensors — none of our model code is imported
for it: ids ``>= vocab_size`` are looked up in the prompt table (row ``id - vocab_size``), other
ids in ``transformer.vocab_embedding``; learned absolute positions are added; each layer is
pre-LN attention with a fused ``qkv`` Linear (weight ``(3C, C)``, output ``[Q | K | V]``, heads
contiguous) and a ``dense`` Linear, then pre-LN MLP ``fc`` → activation → ``proj``; ``ln_f``,
``lm_head`` (no bias), then the request's ``embedding_bias``. Its speech logits are compared with
the T3 engine (``token_service.t3``) on the original weights.

Other checks: config fields, tensor names / shapes / dtypes, vocabulary ranges (text rows of
``lm_head`` zero and masked by the bias, end/start ids inside the speech range, prompt ids
beyond the vocabulary), prompt-table length vs the voice prefix and vs
``max_prompt_embedding_table_size``. The report is a table; the exit status is 1 on any failure.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from export.trtllm_checkpoint import RUNTIME_META

# TensorRT-LLM's ACT2FN maps all GPT-2 GELU spellings to its tanh-approximated ``gelu``.
_TANH_GELU = {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "openai-gelu"}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# relative logit error allowed vs the float32 T3 engine, by checkpoint dtype (weights rounding)
LOGIT_RTOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    seconds: float = 0.0


# ---------------------------------------------------------------------- independent loader
class TRTLLMGPTReader:
    """A TensorRT-LLM GPT checkpoint read back and evaluated in float32 PyTorch (see module docstring)."""

    def __init__(self, checkpoint_dir: str | Path):
        d = Path(checkpoint_dir)
        self.config = json.loads((d / "config.json").read_text())
        self.tensors: dict[str, Tensor] = {}
        with safe_open(str(d / "rank0.safetensors"), framework="pt") as f:
            for k in f.keys():
                self.tensors[k] = f.get_tensor(k)
        c = self.config
        self.L, self.C, self.H = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]
        self.V, self.eps = c["vocab_size"], c["norm_epsilon"]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        C, V, F = self.C, self.V, c.get("intermediate_size") or 4 * self.C
        kv = c.get("num_key_value_heads") or self.H
        qkv = C + 2 * kv * (C // self.H)
        shapes = {"transformer.vocab_embedding.weight": (V, C),
                  "transformer.position_embedding.weight": (c["max_position_embeddings"], C),
                  "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,), "lm_head.weight": (V, C)}
        for i in range(self.L):
            p = f"transformer.layers.{i}."
            shapes.update({p + "input_layernorm.weight": (C,), p + "input_layernorm.bias": (C,),
                           p + "attention.qkv.weight": (qkv, C), p + "attention.qkv.bias": (qkv,),
                           p + "attention.dense.weight": (C, C), p + "attention.dense.bias": (C,),
                           p + "post_layernorm.weight": (C,), p + "post_layernorm.bias": (C,),
                           p + "mlp.fc.weight": (F, C), p + "mlp.fc.bias": (F,),
                           p + "mlp.proj.weight": (C, F), p + "mlp.proj.bias": (C,)})
        return shapes

    def _w(self, name: str) -> Tensor:
        return self.tensors[name].float()

    def _act(self, x: Tensor) -> Tensor:
        act = self.config["hidden_act"]
        if act in _TANH_GELU:
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
        if act == "relu":
            return torch.relu(x)
        raise ValueError(f"unsupported hidden_act {act!r}")

    def _ln(self, x: Tensor, name: str) -> Tensor:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self._w(name + ".weight") + self._w(name + ".bias")

    def _linear(self, x: Tensor, name: str) -> Tensor:
        return x @ self._w(name + ".weight").t() + self._w(name + ".bias")

    @torch.no_grad()
    def logits(self, input_ids: list[int], prompt_table: Tensor | None = None,
               embedding_bias: Tensor | None = None) -> Tensor:
        """One sequence of ids (prompt ids ``>= vocab_size`` included) → logits ``(T, V)`` float32."""
        ids = torch.tensor(input_ids, dtype=torch.long)
        T = ids.numel()
        emb = self._w("transformer.vocab_embedding.weight")
        is_prompt = ids >= self.V
        x = torch.empty(T, self.C)
        x[~is_prompt] = emb[ids[~is_prompt]]
        if bool(is_prompt.any()):
            if prompt_table is None:
                raise ValueError("input has prompt ids but no prompt table was given")
            rows = ids[is_prompt] - self.V
            if int(rows.max()) >= prompt_table.shape[0]:
                raise ValueError(f"prompt id row {int(rows.max())} beyond the table's {prompt_table.shape[0]} rows")
            x[is_prompt] = prompt_table.float()[rows]
        x = x + self._w("transformer.position_embedding.weight")[:T]
        D = self.C // self.H
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for i in range(self.L):
            p = f"transformer.layers.{i}."
            qkv = self._linear(self._ln(x, p + "input_layernorm"), p + "attention.qkv")  # (T, 3C)
            q, k, v = (t.reshape(T, self.H, D).transpose(0, 1) for t in qkv.split(self.C, dim=-1))
            scores = (q @ k.transpose(1, 2)) / math.sqrt(D)  # (H, T, T)
            scores = scores.masked_fill(~causal, float("-inf"))
            att = torch.softmax(scores, dim=-1) @ v  # (H, T, D)
            x = x + self._linear(att.transpose(0, 1).reshape(T, self.C), p + "attention.dense")
            h = self._act(self._linear(self._ln(x, p + "post_layernorm"), p + "mlp.fc"))
            x = x + self._linear(h, p + "mlp.proj")
        x = self._ln(x, "transformer.ln_f")
        out = x @ self._w("lm_head.weight").t()
        if embedding_bias is not None:
            out = out + embedding_bias.float()
        return out


# ---------------------------------------------------------------------- the T3 engine side
@torch.no_grad()
def t3_engine_logits(model_dir: str | Path, voice: str, text_ids: list[int], speech_ids: list[int]) -> Tensor:
    """T3 engine (float32): logits after ``start`` and after each of ``speech_ids`` → ``(1+N, V_speech)``."""
    from export.voice_prefix import load_t3_state_dict, voice_file
    from token_service.t3.generate import decode_step, prefill, required_len
    from token_service.t3.model import KVCache, T3Model
    from token_service.t3.voice import build_voice_prefix, load_voice_conds

    sd, cfg = load_t3_state_dict(model_dir)
    model = T3Model.from_state_dict(sd, cfg)
    prefix = build_voice_prefix(model, load_voice_conds(voice_file(model_dir, voice)), voice)
    cache = KVCache(cfg, 1, required_len(prefix.length, len(text_ids), len(speech_ids) + 1))
    rows = [prefill(model, cache, 0, prefix, torch.tensor(text_ids))]
    pos = prefix.length + len(text_ids) + 1
    for j, tok in enumerate(speech_ids):
        rows.append(decode_step(model, cache, 1, torch.tensor([tok]), torch.tensor([pos + j]))[0])
    return torch.stack(rows)


# ---------------------------------------------------------------------- checks
def _load_table(path: str | Path) -> Tensor:
    with np.load(str(path)) as z:
        if "prompt_table" not in z:
            raise ValueError(f"{path}: no 'prompt_table' array (keys: {list(z.keys())})")
        t = torch.from_numpy(np.array(z["prompt_table"]))
    if t.dim() == 3:
        if t.shape[0] < 1:
            raise ValueError(f"{path}: empty prompt table")
        t = t[0]  # prompt id 0 = the baked voice
    return t


def run_all_tests(checkpoint_dir: str | Path, prompt_table: str | Path | None = None,
                  model_dir: str | Path | None = None, voice: str | None = None,
                  text_ids: list[int] | None = None, speech_ids: list[int] | None = None) -> list[CheckResult]:
    """Run every check; never raises for a failing check (it becomes a failed :class:`CheckResult`)."""
    d = Path(checkpoint_dir)
    results: list[CheckResult] = []

    def check(name: str, fn) -> object:
        t0 = time.perf_counter()
        try:
            ok, detail, value = fn()
        except Exception as e:  # noqa: BLE001 - a crash is a failed check with its message
            ok, detail, value = False, f"{type(e).__name__}: {e}", None
        results.append(CheckResult(name, bool(ok), detail, time.perf_counter() - t0))
        return value

    def files():
        missing = [f for f in ("config.json", "rank0.safetensors", RUNTIME_META, "embedding_bias.npy")
                   if not (d / f).is_file()]
        return not missing, "all present" if not missing else f"missing {missing}", None
    check("files", files)
    if not results[-1].passed:
        return results
    meta = json.loads((d / RUNTIME_META).read_text())
    reader = check("load checkpoint", lambda: (True, "read", TRTLLMGPTReader(d)))
    if reader is None:
        return results
    cfg = reader.config

    def config_fields():
        problems = []
        want = {"architecture": "GPTForCausalLM", "position_embedding_type": "learned_absolute"}
        problems += [f"{k}={cfg.get(k)!r} (want {v!r})" for k, v in want.items() if cfg.get(k) != v]
        if cfg.get("hidden_act") not in _TANH_GELU:
            problems.append(f"hidden_act={cfg.get('hidden_act')!r} is not a tanh GELU")
        if cfg.get("dtype") not in _DTYPES:
            problems.append(f"dtype={cfg.get('dtype')!r}")
        if cfg.get("num_key_value_heads", cfg["num_attention_heads"]) != cfg["num_attention_heads"]:
            problems.append("num_key_value_heads != num_attention_heads")
        if cfg["vocab_size"] != meta["text_vocab_size"] + meta["speech_vocab_size"]:
            problems.append(f"vocab_size {cfg['vocab_size']} != text {meta['text_vocab_size']} + speech "
                            f"{meta['speech_vocab_size']}")
        m = cfg.get("mapping", {})
        if m.get("tp_size", 1) != 1 or m.get("pp_size", 1) != 1:
            problems.append(f"mapping {m} (one rank expected)")
        return not problems, "; ".join(problems) or (f"GPT-2 {cfg['num_hidden_layers']}x{cfg['hidden_size']}, "
                                                     f"{cfg['num_attention_heads']} heads, vocab {cfg['vocab_size']}, "
                                                     f"{cfg['dtype']}"), None
    check("config", config_fields)

    def tensors():
        exp = reader.expected_shapes()
        got = {k: tuple(v.shape) for k, v in reader.tensors.items()}
        missing = sorted(set(exp) - set(got))
        extra = sorted(set(got) - set(exp))
        bad = [f"{k}: {got[k]} != {exp[k]}" for k in exp if k in got and got[k] != exp[k]]
        wrong_dtype = sorted({str(v.dtype) for v in reader.tensors.values()} - {str(_DTYPES.get(cfg["dtype"]))})
        problems = ([f"missing {missing[:4]}"] if missing else []) + ([f"unexpected {extra[:4]}"] if extra else []) \
            + bad[:4] + ([f"dtypes {wrong_dtype} != {cfg['dtype']}"] if wrong_dtype else [])
        return not problems, "; ".join(problems) or f"{len(exp)} tensors, shapes and dtype {cfg['dtype']} ok", None
    check("tensor names/shapes/dtypes", tensors)

    def vocab():
        Vt, V = meta["text_vocab_size"], cfg["vocab_size"]
        problems = []
        head = reader.tensors["lm_head.weight"]
        if head.shape[0] != V:
            problems.append("lm_head rows != vocab_size")
        elif bool(head[:Vt].float().abs().max() != 0):
            problems.append("lm_head text rows are not zero")
        bias = np.load(d / "embedding_bias.npy")
        if bias.shape != (V,) or bias.dtype != np.float32:
            problems.append(f"embedding_bias shape/dtype {bias.shape}/{bias.dtype} != ({V},)/float32")
        else:
            if not (bias[:Vt] <= -1e4).all():
                problems.append("embedding_bias does not mask every text id")
            if not np.isfinite(bias[Vt:]).all():
                problems.append("embedding_bias speech part not finite")
        for key in ("start_speech_id", "end_id"):
            if not Vt <= meta[key] < V:
                problems.append(f"{key}={meta[key]} outside the speech range [{Vt}, {V})")
        lo, hi = meta["prompt_ids"]
        if lo != V or hi - lo != meta["prefix_len"]:
            problems.append(f"prompt ids [{lo}, {hi}) are not [vocab_size, vocab_size + prefix_len)")
        return not problems, "; ".join(problems) or (f"text [0, {Vt}), speech [{Vt}, {V}), end_id {meta['end_id']}, "
                                                     f"prompt ids [{lo}, {hi})"), None
    check("vocabulary ranges", vocab)

    table_path = Path(prompt_table) if prompt_table else d / "prompt_table.npz"

    def table():
        t = _load_table(table_path)
        P, C = meta["prefix_len"], cfg["hidden_size"]
        limit = meta.get("limits", {}).get("max_prompt_embedding_table_size", 0)
        problems = []
        if tuple(t.shape) != (P, C):
            problems.append(f"table {tuple(t.shape)} != prefix ({P}, {C})")
        if limit < P:
            problems.append(f"max_prompt_embedding_table_size {limit} < prefix length {P}")
        if not torch.isfinite(t.float()).all():
            problems.append("non-finite values")
        want = meta.get("prompt_table_dtype")
        if want and str(t.dtype).replace("torch.", "") != want:
            problems.append(f"table dtype {t.dtype} != {want}")
        return not problems, "; ".join(problems) or f"({P}, {C}) {t.dtype}, engine table size {limit}", t
    tbl = check("prompt table", table)

    src_dir = model_dir or meta.get("source_model_dir")
    voice = voice or meta.get("voice") or meta.get("baked_voice", "default")
    if tbl is None or not src_dir:
        results.append(CheckResult("logits vs T3 engine", False,
                                   "skipped: no prompt table or no --model_dir (and none recorded)"))
        return results

    def parity():
        tids = text_ids or [min(k * 997 % meta["text_vocab_size"], meta["text_vocab_size"] - 1) for k in range(1, 9)]
        sids = speech_ids or [17, 4299, 1234, 6000]
        ref = t3_engine_logits(src_dir, voice, tids, sids)  # (1+N, Vs)
        lo, hi = meta["prompt_ids"]
        ids = list(range(lo, hi)) + tids + [meta["start_speech_id"]] + [meta["speech_offset"] + s for s in sids]
        bias = torch.from_numpy(np.load(d / "embedding_bias.npy"))
        got = reader.logits(ids, tbl, bias)[-(1 + len(sids)):]
        Vt = meta["text_vocab_size"]
        speech = got[:, Vt:]
        rel = float((speech - ref).abs().max() / ref.abs().max())
        tol = LOGIT_RTOL[cfg["dtype"]]
        text_max = float(got[:, :Vt].max())
        agree = float((speech.argmax(-1) == ref.argmax(-1)).float().mean())
        ok = rel <= tol and text_max < -1e4
        return ok, (f"max rel err {rel:.2e} (tol {tol:.0e}, {cfg['dtype']}), argmax agree {agree:.0%}, "
                    f"text logits <= {text_max:.1e}, {len(ids)} positions"), rel
    check("logits vs T3 engine", parity)
    return results


def print_validation_report(results: list[CheckResult], file=None) -> bool:
    """Print a table of the checks; returns True if all passed."""
    file = file or sys.stdout
    w = max(len(r.name) for r in results) if results else 10
    print(f"{'check':<{w}}  result  time    detail", file=file)
    print("-" * (w + 60), file=file)
    for r in results:
        print(f"{r.name:<{w}}  {'PASS' if r.passed else 'FAIL':<6}  {r.seconds:5.1f}s  {r.detail}", file=file)
    ok = bool(results) and all(r.passed for r in results)
    print(f"\n{sum(r.passed for r in results)}/{len(results)} checks passed: {'OK' if ok else 'FAILED'}", file=file)
    return ok


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint_dir", "--checkpoint-dir", required=True, help="TensorRT-LLM checkpoint folder")
    p.add_argument("--prompt_table", "--prompt-table", default=None,
                   help="prompt table .npz (default: <checkpoint_dir>/prompt_table.npz)")
    p.add_argument("--model_dir", "--model-dir", default=None,
                   help="model folder with the original T3 weights (default: the one recorded at export)")
    p.add_argument("--voice", default=None, help="voice of the prompt table (default: the recorded one)")


def run_cli(args: argparse.Namespace) -> int:
    results = run_all_tests(args.checkpoint_dir, args.prompt_table, args.model_dir, args.voice)
    return 0 if print_validation_report(results) else 1


def register(subparsers) -> None:
    """``tts-export validate``."""
    p = subparsers.add_parser("validate", help="validate a TensorRT-LLM T3 checkpoint (independent loader)")
    add_arguments(p)
    p.set_defaults(func=run_cli)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.validate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
