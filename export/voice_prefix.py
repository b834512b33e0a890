"""A voice as a fixed T3 prefix: ``spkr_enc(speaker_emb)`` ⊕ ``speech_emb(prompt tokens)``.

Turbo's conditioning (upstream ``T3.prepare_conditioning`` with no perceiver and no emotion) is
one speaker-projection row followed by the prompt speech-token embeddings: ``(1 + 375, C)``.
These rows are what TensorRT-LLM reads from the prompt table, and what :class:`T3ForTRT`
prepends. The file written here is ``<name>.safetensors`` (tensor ``voice_prefix``, ``(P, C)``)
plus ``<name>.json`` with its metadata.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from token_service.t3.config import T3Config

T3_WEIGHT_FILES = ("t3_turbo_v1.safetensors", "t3_nano_v1.safetensors")


def find_t3_weights(model_dir: str | Path) -> Path:
    """The T3 weights file of a model folder (Turbo first, then Nano)."""
    d = Path(model_dir)
    for name in T3_WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(f"{d}: no T3 weights ({' or '.join(T3_WEIGHT_FILES)}) in this model folder")


def load_t3_state_dict(model_dir: str | Path) -> tuple[dict[str, Tensor], T3Config]:
    """Upstream-keyed T3 state dict (float32) and its config, read from a model folder."""
    path = find_t3_weights(model_dir)
    sd = load_file(str(path))
    if "model" in sd:  # upstream tolerates a nested {"model": [sd]} layout; safetensors cannot hold it
        raise ValueError(f"{path}: unexpected nested 'model' key")
    cfg = T3Config.from_state_dict(sd)
    return {k: v.float() for k, v in sd.items()}, cfg


def voice_file(model_dir: str | Path, voice: str, voices_dir: str | Path | None = None) -> Path:
    """``default`` → ``<model_dir>/conds.pt``; other names → ``<voices_dir or model_dir/voices>/<name>.pt``."""
    if voice == "default":
        path = Path(model_dir) / "conds.pt"
    else:
        if not voice or "/" in voice or voice.startswith("."):
            raise ValueError(f"invalid voice name {voice!r}")
        path = Path(voices_dir or Path(model_dir) / "voices") / f"{voice}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"voice {voice!r}: {path} does not exist")
    return path


def load_t3_conds(path: str | Path) -> tuple[Tensor, Tensor]:
    """``conds.pt`` → ``speaker_emb (1, S)`` float32, ``prompt_tokens (1, N)`` int64."""
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    try:
        t3 = data["t3"]
        spk = t3["speaker_emb"]
        tok = t3["cond_prompt_speech_tokens"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a conds.pt file (needs t3.speaker_emb and t3.cond_prompt_speech_tokens)") from e
    if tok is None:
        raise ValueError(f"{path}: t3.cond_prompt_speech_tokens is empty")
    return spk.float().reshape(1, -1), torch.atleast_2d(tok.long())


@torch.no_grad()
def compute_voice_prefix(t3_sd: dict[str, Tensor], model_dir: str | Path, voice: str = "default",
                         cfg: T3Config | None = None, voices_dir: str | Path | None = None) -> Tensor:
    """The voice prefix ``(1 + N, C)`` float32 computed from the T3 weights and the voice's conds."""
    cfg = cfg or T3Config.from_state_dict(t3_sd)
    spk, tok = load_t3_conds(voice_file(model_dir, voice, voices_dir))
    if spk.shape[1] != cfg.speaker_embed_size:
        raise ValueError(f"voice {voice!r}: speaker_emb has {spk.shape[1]} values, the model expects "
                         f"{cfg.speaker_embed_size}")
    if int(tok.min()) < 0 or int(tok.max()) >= cfg.speech_vocab_size:
        raise ValueError(f"voice {voice!r}: prompt tokens outside [0, {cfg.speech_vocab_size})")
    w, b = t3_sd["cond_enc.spkr_enc.weight"].float(), t3_sd["cond_enc.spkr_enc.bias"].float()
    speaker_row = torch.nn.functional.linear(spk, w, b)  # (1, C)
    prompt_rows = t3_sd["speech_emb.weight"].float()[tok[0]]  # (N, C)
    return torch.cat([speaker_row, prompt_rows], dim=0).contiguous()


def extract_and_save_voice_prefix(model_dir: str | Path, voice: str, output_path: str | Path,
                                  voices_dir: str | Path | None = None, dtype: str = "float32") -> dict:
    """Compute ``voice``'s prefix and write ``output_path`` (.safetensors) + the ``.json`` metadata.

    Returns the metadata: ``length``, ``width``, ``dtype``, ``voice``, ``source_checkpoint``,
    ``source_voice_file``, ``sha256`` of the weights file, and the written ``path``/``metadata_path``.
    """
    t3_sd, cfg = load_t3_state_dict(model_dir)
    prefix = compute_voice_prefix(t3_sd, model_dir, voice, cfg, voices_dir)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
    out = Path(output_path)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"voice_prefix": prefix.to(torch_dtype)}, str(out))
    weights = find_t3_weights(model_dir)
    meta = {
        "voice": voice,
        "length": int(prefix.shape[0]),
        "width": int(prefix.shape[1]),
        "dtype": dtype,
        "layout": "row 0 = cond_enc.spkr_enc(speaker_emb); rows 1.. = speech_emb(cond_prompt_speech_tokens)",
        "source_checkpoint": str(weights.resolve()),
        "source_checkpoint_sha256": _sha256(weights),
        "source_voice_file": str(voice_file(model_dir, voice, voices_dir).resolve()),
        "preset": cfg.name,
        "path": str(out),
        "metadata_path": str(out.with_suffix(".json")),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return meta


def load_voice_prefix(path: str | Path) -> tuple[Tensor, dict]:
    """Read a prefix written by :func:`extract_and_save_voice_prefix`: ``(P, C)`` tensor and metadata."""
    path = Path(path)
    prefix = load_file(str(path))["voice_prefix"]
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta and (meta.get("length"), meta.get("width")) != tuple(prefix.shape):
        raise ValueError(f"{path}: shape {tuple(prefix.shape)} disagrees with its metadata "
                         f"({meta.get('length')}, {meta.get('width')})")
    return prefix, meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["extract_and_save_voice_prefix", "compute_voice_prefix", "load_voice_prefix", "load_t3_state_dict",
           "load_t3_conds", "voice_file", "find_t3_weights"]
