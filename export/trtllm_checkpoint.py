"""T3ForTRT → a TensorRT-LLM GPT checkpoint, prompt tables and the ``trtllm-build`` script.

Checkpoint layout (TensorRT-LLM's unified checkpoint, ``GPTForCausalLM``, one rank):

* ``config.json``: ``architecture``, ``dtype``, ``logits_dtype``, ``num_hidden_layers``,
  ``num_attention_heads``, ``num_key_value_heads``, ``hidden_size``, ``intermediate_size``,
  ``norm_epsilon``, ``vocab_size``, ``position_embedding_type = "learned_absolute"``,
  ``max_position_embeddings``, ``hidden_act = "gelu_new"`` (GPT-2's tanh GELU), ``bias``,
  ``rotary_pct = 0``, ``mapping`` (tp = pp = 1), ``quantization`` (none), ``gpt_variant = "gpt2"``.
* ``rank0.safetensors`` with TensorRT-LLM's GPT names. GPT-2 stores its linears as ``Conv1D``
  ``(in, out)``; TensorRT-LLM's ``Linear`` stores ``(out, in)``, so every transformer weight is
  transposed. ``attention.qkv`` keeps GPT-2's fused order ``[Q; K; V]`` along the output axis
  (heads contiguous inside each of Q, K, V), which is what TensorRT-LLM's GPT expects for
  ``num_kv_heads == num_heads``.

  ``transformer.vocab_embedding.weight (V, C)``, ``transformer.position_embedding.weight (N, C)``,
  ``transformer.layers.{i}.input_layernorm.{weight,bias}``,
  ``transformer.layers.{i}.attention.qkv.{weight (3C, C),bias (3C)}``,
  ``transformer.layers.{i}.attention.dense.{weight (C, C),bias}``,
  ``transformer.layers.{i}.post_layernorm.{weight,bias}``,
  ``transformer.layers.{i}.mlp.fc.{weight (4C, C),bias}``, ``transformer.layers.{i}.mlp.proj.{weight (C, 4C),bias}``,
  ``transformer.ln_f.{weight,bias}``, ``lm_head.weight (V, C)``.

What TensorRT-LLM's GPT lacks, and the request-level feature used instead:

* **speech head bias / never sample text**: ``lm_head`` has no bias. ``embedding_bias.npy``
  (``(V,)`` float32: ``TEXT_MASK`` for text ids, ``speech_head.bias`` for speech ids) is passed
  with every request as ``Request(embedding_bias=...)``; TensorRT-LLM adds it to the logits
  before sampling, so text ids get probability 0 and speech logits equal T3's exactly.
  (``logits_dtype`` is float32 so the bias is added in float32.)
* **stop token is a speech id**: ``end_id = V_text + 6562`` (unified), per request.
* **voice conditioning**: a prompt table per voice; the request's input ids start with the
  ``P`` ids ``V, V+1, …, V+P-1`` (``V`` = vocab size), which TensorRT-LLM replaces by rows
  ``0..P-1`` of the request's ``PromptTuningConfig(embedding_table)``; positions are added to
  them exactly as GPT-2 adds ``wpe`` to T3's prefix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from export.t3_for_trt import T3ForTRT, T3ForTRTConfig

TEXT_MASK = -1.0e9  # added to text-id logits: exp(TEXT_MASK - max) == 0 in float32
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RUNTIME_META = "t3_trtllm.json"


def trtllm_config(cfg: T3ForTRTConfig, dtype: str = "float16") -> dict:
    """TensorRT-LLM ``config.json`` for a GPT-2 (learned absolute positions) over the unified vocab."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    return {
        "architecture": "GPTForCausalLM",
        "dtype": dtype,
        "logits_dtype": "float32",
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "hidden_size": cfg.n_embd,
        "intermediate_size": 4 * cfg.n_embd,
        "norm_epsilon": cfg.layer_norm_eps,
        "vocab_size": cfg.total_vocab_size,
        "position_embedding_type": "learned_absolute",
        "max_position_embeddings": cfg.n_positions,
        "hidden_act": "gelu_new",
        "bias": True,
        "rotary_pct": 0.0,
        "apply_query_key_layer_scaling": False,
        "share_embedding_table": False,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "gpt_variant": "gpt2",
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
    }


@torch.no_grad()
def trtllm_weights(model: T3ForTRT, dtype: str = "float16") -> dict[str, Tensor]:
    """T3ForTRT parameters → TensorRT-LLM GPT tensors (names and layouts in the module docstring)."""
    td = DTYPES[dtype]
    sd = model.state_dict()
    w: dict[str, Tensor] = {
        "transformer.vocab_embedding.weight": sd["embed.weight"],
        "transformer.position_embedding.weight": sd["tfmr.wpe.weight"],
        "transformer.ln_f.weight": sd["tfmr.ln_f.weight"],
        "transformer.ln_f.bias": sd["tfmr.ln_f.bias"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(model.cfg.n_layer):
        src, dst = f"tfmr.h.{i}.", f"transformer.layers.{i}."
        for a, b in (("ln_1", "input_layernorm"), ("ln_2", "post_layernorm")):
            w[dst + b + ".weight"] = sd[src + a + ".weight"]
            w[dst + b + ".bias"] = sd[src + a + ".bias"]
        for a, b in (("attn.c_attn", "attention.qkv"), ("attn.c_proj", "attention.dense"),
                     ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
            w[dst + b + ".weight"] = sd[src + a + ".weight"].t()  # Conv1D (in, out) -> Linear (out, in)
            w[dst + b + ".bias"] = sd[src + a + ".bias"]
    return {k: v.to(td).contiguous() for k, v in w.items()}


def embedding_bias(model: T3ForTRT) -> np.ndarray:
    """``(V_total,)`` float32: ``TEXT_MASK`` on text ids, ``speech_head.bias`` on speech ids."""
    bias = model.logit_bias.detach().float().clone()
    bias[: model.cfg.text_vocab_size] = TEXT_MASK
    return bias.numpy()


@dataclass
class BuildLimits:
    """Engine limits for ``trtllm-build`` (the input includes the ``P`` prompt-table ids)."""

    max_batch_size: int = 64
    max_text_tokens: int = 400
    max_new_tokens: int = 1001  # upstream samples up to 1001 tokens (stop included)
    dtype: str = "float16"
    max_num_tokens: int = 8192
    prompt_tables_per_batch: int | None = None  # None: one table per running request (max_batch_size)

    def max_input_len(self, prefix_len: int) -> int:
        return prefix_len + self.max_text_tokens + 1  # + start-of-speech

    def max_seq_len(self, prefix_len: int) -> int:
        return self.max_input_len(prefix_len) + self.max_new_tokens

    def max_prompt_embedding_table_size(self, prefix_len: int) -> int:
        return prefix_len * (self.prompt_tables_per_batch or self.max_batch_size)


def build_engine_script(checkpoint_dir: str, engine_dir: str, cfg: T3ForTRTConfig, limits: BuildLimits) -> str:
    """A bash script that runs ``trtllm-build`` on the checkpoint with T3's flags."""
    P = cfg.prefix_len
    if limits.max_seq_len(P) > cfg.n_positions:
        raise ValueError(f"max_seq_len {limits.max_seq_len(P)} (prefix {P} + text {limits.max_text_tokens} + 1 + "
                         f"new {limits.max_new_tokens}) exceeds the model's {cfg.n_positions} positions")
    if limits.dtype not in DTYPES:
        raise ValueError(f"engine dtype must be float16, bfloat16 or float32, not {limits.dtype!r}")
    table = limits.max_prompt_embedding_table_size(P)
    flags = [
        ("--checkpoint_dir", '"$CHECKPOINT_DIR"'), ("--output_dir", '"$ENGINE_DIR"'),
        ("--gemm_plugin", limits.dtype), ("--gpt_attention_plugin", limits.dtype),
        ("--context_fmha", "enable"), ("--use_paged_context_fmha", "enable"),
        ("--paged_kv_cache", "enable"), ("--remove_input_padding", "enable"),
        ("--max_batch_size", str(limits.max_batch_size)),
        ("--max_input_len", str(limits.max_input_len(P))),
        ("--max_seq_len", str(limits.max_seq_len(P))),
        ("--max_num_tokens", str(limits.max_num_tokens)),
        ("--max_beam_width", "1"),
        ("--max_prompt_embedding_table_size", str(table)),
    ]
    lines = "\n".join(f"    {k} {v} \\" for k, v in flags).rstrip(" \\")
    return f"""#!/usr/bin/env bash
# Build the T3 TensorRT-LLM engine (generated by `tts-export trtllm`). Run inside NVIDIA's
# TensorRT-LLM container (nvcr.io/nvidia/tensorrt-llm/release), on the GPU that will serve it.
#   prompt tuning: the voice prefix ({P} rows) comes from a per-request prompt table;
#   max_prompt_embedding_table_size = {P} x {table // P} tables in flight.
#   input = {P} prompt ids + up to {limits.max_text_tokens} text ids + start-of-speech; output <= {limits.max_new_tokens} speech ids.
set -euo pipefail
CHECKPOINT_DIR="${{CHECKPOINT_DIR:-{checkpoint_dir}}}"
ENGINE_DIR="${{ENGINE_DIR:-{engine_dir}}}"
trtllm-build \\
{lines}
cp "$CHECKPOINT_DIR/{RUNTIME_META}" "$CHECKPOINT_DIR/embedding_bias.npy" "$ENGINE_DIR/"
cp -r "$CHECKPOINT_DIR/prompt_tables" "$CHECKPOINT_DIR/prompt_table.npz" "$ENGINE_DIR/"
echo "engine written to $ENGINE_DIR"
"""


def _np_table(prefix: Tensor, dtype: str) -> np.ndarray:
    """``(1, P, C)``: task 0 = this voice. bfloat16 tables are stored as float32 (numpy has no bf16)."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    return prefix.detach().float().numpy().astype(np_dtype)[None]


def write_trtllm_checkpoint(model: T3ForTRT, output_dir: str | Path, voices: dict[str, Tensor] | None = None,
                            baked_voice: str = "default", limits: BuildLimits | None = None,
                            engine_dir: str | None = None, source: dict | None = None) -> dict[str, Path]:
    """Write the whole TensorRT-LLM side for ``model`` into ``output_dir``; returns the paths.

    ``voices``: name → prefix ``(P, C)``; defaults to ``{baked_voice: model.voice_prefix}``.
    ``prompt_table.npz`` (key ``prompt_table``, ``(1, P, C)``) holds the baked voice as prompt id 0;
    ``prompt_tables/<voice>.npz`` one table per voice. ``source`` (e.g. ``model_dir``) is recorded
    in ``t3_trtllm.json`` so that validation can find the T3 weights it compares with.
    """
    limits = limits or BuildLimits()
    cfg = model.cfg
    voices = dict(voices or {})
    if not voices:
        if not model.has_voice_prefix:
            raise RuntimeError("voice prefix not set: the model has no baked voice and no voices were given")
        voices[baked_voice] = model.voice_prefix
    if baked_voice not in voices:
        raise ValueError(f"baked voice {baked_voice!r} is not among the voices {sorted(voices)}")
    for name, p in voices.items():
        if tuple(p.shape) != (cfg.prefix_len, cfg.n_embd):
            raise ValueError(f"voice {name!r}: prefix shape {tuple(p.shape)} != ({cfg.prefix_len}, {cfg.n_embd})")
    out = Path(output_dir)
    (out / "prompt_tables").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["config"] = out / "config.json"
    paths["config"].write_text(json.dumps(trtllm_config(cfg, limits.dtype), indent=2))
    paths["weights"] = out / "rank0.safetensors"
    save_file(trtllm_weights(model, limits.dtype), str(paths["weights"]))
    paths["embedding_bias"] = out / "embedding_bias.npy"
    np.save(paths["embedding_bias"], embedding_bias(model))
    paths["prompt_table"] = out / "prompt_table.npz"
    np.savez(paths["prompt_table"], prompt_table=_np_table(voices[baked_voice], limits.dtype))
    for name, p in voices.items():
        paths[f"prompt_table:{name}"] = out / "prompt_tables" / f"{name}.npz"
        np.savez(paths[f"prompt_table:{name}"], prompt_table=_np_table(p, limits.dtype))
    meta = {
        "format": "t3-trtllm/1",
        **(source or {}),
        "preset": cfg.name,
        "text_vocab_size": cfg.text_vocab_size,
        "speech_vocab_size": cfg.speech_vocab_size,
        "vocab_size": cfg.total_vocab_size,
        "speech_offset": cfg.speech_offset,
        "start_speech_id": cfg.start_speech_id,
        "end_id": cfg.stop_speech_id,
        "pad_id": cfg.stop_speech_id,
        "prefix_len": cfg.prefix_len,
        "prompt_ids": [cfg.total_vocab_size, cfg.total_vocab_size + cfg.prefix_len],
        "baked_voice": baked_voice,
        "voices": {n: f"prompt_tables/{n}.npz" for n in voices},
        "embedding_bias": "embedding_bias.npy",
        "text_mask": TEXT_MASK,
        "dtype": limits.dtype,
        "prompt_table_dtype": "float16" if limits.dtype == "float16" else "float32",
        "limits": {"max_batch_size": limits.max_batch_size, "max_text_tokens": limits.max_text_tokens,
                   "max_new_tokens": limits.max_new_tokens, "max_input_len": limits.max_input_len(cfg.prefix_len),
                   "max_seq_len": limits.max_seq_len(cfg.prefix_len),
                   "max_prompt_embedding_table_size": limits.max_prompt_embedding_table_size(cfg.prefix_len)},
    }
    paths["runtime_meta"] = out / RUNTIME_META
    paths["runtime_meta"].write_text(json.dumps(meta, indent=2))
    paths["build_script"] = out / "build_engine.sh"
    paths["build_script"].write_text(build_engine_script(str(out.resolve()),
                                                         engine_dir or str((out / "engine").resolve()), cfg, limits))
    paths["build_script"].chmod(0o755)
    return paths


def request_input_ids(meta: dict, text_ids: list[int]) -> list[int]:
    """The request's ``input_token_ids``: prompt-table ids, the text ids, start-of-speech."""
    lo, hi = meta["prompt_ids"]
    bad = [t for t in text_ids if not 0 <= t < meta["text_vocab_size"]]
    if bad:
        raise ValueError(f"text ids outside [0, {meta['text_vocab_size']}): {bad[:5]}")
    return list(range(lo, hi)) + list(text_ids) + [meta["start_speech_id"]]


__all__ = ["trtllm_config", "trtllm_weights", "embedding_bias", "BuildLimits", "build_engine_script",
           "write_trtllm_checkpoint", "request_input_ids", "TEXT_MASK", "RUNTIME_META"]
