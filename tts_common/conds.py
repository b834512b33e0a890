"""Voices: ``conds.pt`` (upstream's ``Conditionals.save`` format) loaded safely and validated.

A voice file is ``torch.save({"t3": {...}, "gen": {...}})`` holding only tensors, floats and
``None``, and is read with ``torch.load(weights_only=True)`` (no pickled code runs)::

    t3:  speaker_emb               (1, 256) float     voice-encoder embedding
         cond_prompt_speech_tokens (1, 375) int       prompt speech tokens (ids < 6561)
         emotion_adv               (1, 1, 1) float    (unused by Turbo; upstream stores 0.5)
         clap_emb, cond_prompt_speech_emb             optional, normally None
    gen: prompt_token              (1, T) int         S3Gen prompt speech tokens (ids < 6561)
         prompt_token_len          (1,) int           = T
         prompt_feat               (1, 2T, 80) float  prompt log-mel frames (50 Hz)
         prompt_feat_len           None or (1,) int
         embedding                 (1, 192) float     CAM++ x-vector

The folder's ``conds.pt`` is the voice ``default``; ``voices/<name>.pt`` add more.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

DEFAULT_VOICE = "default"
SPEECH_VOCAB = 6561  # valid speech-token ids are 0 .. 6560
SPEAKER_EMB_DIM = 256
XVECTOR_DIM = 192
N_MELS = 80
T3_PROMPT_LEN = 375
_VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class VoiceError(ValueError):
    """A voice file is missing, unreadable or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class T3Conds:
    """T3 conditioning of one voice (upstream's ``T3Cond`` fields)."""

    speaker_emb: torch.Tensor                       # (1, 256) float32
    cond_prompt_speech_tokens: torch.Tensor         # (1, P) int64, P = 375 for Turbo
    emotion_adv: Optional[torch.Tensor] = None      # (1, 1, 1) float32
    clap_emb: Optional[torch.Tensor] = None
    cond_prompt_speech_emb: Optional[torch.Tensor] = None  # (1, P, D) if precomputed


@dataclass(frozen=True)
class GenConds:
    """S3Gen conditioning of one voice (upstream's ``ref_dict``)."""

    prompt_token: torch.Tensor                      # (1, T) int64
    prompt_token_len: torch.Tensor                  # (1,) int64, = T
    prompt_feat: torch.Tensor                       # (1, 2T, 80) float32
    embedding: torch.Tensor                         # (1, 192) float32
    prompt_feat_len: Optional[torch.Tensor] = None  # (1,) int64 or None

    def as_dict(self) -> dict[str, Any]:
        """The ``ref_dict`` upstream's ``S3Gen.inference`` takes."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Voice:
    """One voice: its name, where it came from, and its T3 and S3Gen conditioning."""

    name: str
    path: Path
    t3: T3Conds
    gen: GenConds

    def to_saved(self) -> dict[str, dict[str, Any]]:
        """The object upstream's ``Conditionals.save`` writes (``{"t3": ..., "gen": ...}``)."""
        t3 = {f.name: getattr(self.t3, f.name) for f in fields(self.t3)}
        return {"t3": t3, "gen": self.gen.as_dict()}


def _err(path: Path, msg: str) -> VoiceError:
    return VoiceError(f"{path}: {msg}")


def _tensor(path: Path, part: str, d: Mapping[str, Any], key: str, *, required: bool = True) -> Optional[torch.Tensor]:
    if key not in d or d[key] is None:
        if required:
            raise _err(path, f"missing {part}.{key}")
        return None
    v = d[key]
    if not torch.is_tensor(v):
        raise _err(path, f"{part}.{key} must be a tensor, found {type(v).__name__}")
    return v


def _shape(path: Path, name: str, t: torch.Tensor, shape: tuple[Optional[int], ...]) -> None:
    ok = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
    if not ok:
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise _err(path, f"{name} has shape {tuple(t.shape)}, expected {want}")


def _is_int(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def _float(path: Path, name: str, t: torch.Tensor) -> torch.Tensor:
    if not t.dtype.is_floating_point:
        raise _err(path, f"{name} has dtype {t.dtype}, expected a floating-point tensor")
    if not torch.isfinite(t).all():
        raise _err(path, f"{name} contains NaN or inf")
    return t.float()


def _tokens(path: Path, name: str, t: torch.Tensor) -> torch.Tensor:
    if not _is_int(t):
        raise _err(path, f"{name} has dtype {t.dtype}, expected an integer tensor (speech-token ids)")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= SPEECH_VOCAB):
        raise _err(path, f"{name} has ids outside [0, {SPEECH_VOCAB}): min {int(t.min())}, max {int(t.max())}")
    return t.long()


def parse_voice(obj: Any, path: Union[str, Path], name: str = DEFAULT_VOICE,
                prompt_len: Optional[int] = T3_PROMPT_LEN) -> Voice:
    """Validate a loaded ``conds.pt`` object and return it typed (tensors on CPU, int64 / float32).

    ``prompt_len``: the T3 prompt length the model expects (375 for all presets); ``None`` accepts any.
    """
    path = Path(path)
    if not isinstance(obj, Mapping) or "t3" not in obj or "gen" not in obj:
        raise _err(path, "not a voice file: expected a dict with 't3' and 'gen' entries")
    t3, gen = obj["t3"], obj["gen"]
    if not isinstance(t3, Mapping) or not isinstance(gen, Mapping):
        raise _err(path, "'t3' and 'gen' must both be dicts")
    known_t3 = {f.name for f in fields(T3Conds)}
    if extra := sorted(set(t3) - known_t3):
        raise _err(path, f"unknown t3 field(s) {extra}; known: {sorted(known_t3)}")
    known_gen = {f.name for f in fields(GenConds)}
    if extra := sorted(set(gen) - known_gen):
        raise _err(path, f"unknown gen field(s) {extra}; known: {sorted(known_gen)}")

    spk = _tensor(path, "t3", t3, "speaker_emb")
    _shape(path, "t3.speaker_emb", spk, (1, SPEAKER_EMB_DIM))
    spk = _float(path, "t3.speaker_emb", spk)
    ptok = _tensor(path, "t3", t3, "cond_prompt_speech_tokens")
    _shape(path, "t3.cond_prompt_speech_tokens", ptok, (1, prompt_len))
    ptok = _tokens(path, "t3.cond_prompt_speech_tokens", ptok)
    emo = t3.get("emotion_adv")
    if emo is not None:
        if isinstance(emo, (int, float)) and not isinstance(emo, bool):
            emo = torch.full((1, 1, 1), float(emo))
        elif not torch.is_tensor(emo):
            raise _err(path, f"t3.emotion_adv must be a number or tensor, found {type(emo).__name__}")
        if emo.numel() != 1:
            raise _err(path, f"t3.emotion_adv has shape {tuple(emo.shape)}, expected one value (1, 1, 1)")
        emo = _float(path, "t3.emotion_adv", emo).reshape(1, 1, 1)
    clap = _tensor(path, "t3", t3, "clap_emb", required=False)
    if clap is not None:
        raise _err(path, "t3.clap_emb is set, but upstream's T3 does not implement CLAP conditioning")
    pemb = _tensor(path, "t3", t3, "cond_prompt_speech_emb", required=False)
    if pemb is not None:
        _shape(path, "t3.cond_prompt_speech_emb", pemb, (1, ptok.shape[1], None))
        pemb = _float(path, "t3.cond_prompt_speech_emb", pemb)

    tok = _tensor(path, "gen", gen, "prompt_token")
    _shape(path, "gen.prompt_token", tok, (1, None))
    tok = _tokens(path, "gen.prompt_token", tok)
    n = tok.shape[1]
    if n == 0:
        raise _err(path, "gen.prompt_token is empty")
    tlen = _tensor(path, "gen", gen, "prompt_token_len")
    if not _is_int(tlen) or tlen.numel() != 1:
        raise _err(path, f"gen.prompt_token_len must be one integer, found shape {tuple(tlen.shape)} dtype {tlen.dtype}")
    if int(tlen.reshape(-1)[0]) != n:
        raise _err(path, f"gen.prompt_token_len is {int(tlen.reshape(-1)[0])}, but gen.prompt_token has {n} tokens")
    feat = _tensor(path, "gen", gen, "prompt_feat")
    _shape(path, "gen.prompt_feat", feat, (1, 2 * n, N_MELS))
    feat = _float(path, "gen.prompt_feat", feat)
    flen = _tensor(path, "gen", gen, "prompt_feat_len", required=False)
    if flen is not None:
        if not _is_int(flen) or flen.numel() != 1 or int(flen.reshape(-1)[0]) != 2 * n:
            raise _err(path, f"gen.prompt_feat_len must be None or the integer {2 * n}, found {flen.tolist()}")
        flen = flen.reshape(1).long()
    emb = _tensor(path, "gen", gen, "embedding")
    _shape(path, "gen.embedding", emb, (1, XVECTOR_DIM))
    emb = _float(path, "gen.embedding", emb)

    return Voice(
        name=name,
        path=path,
        t3=T3Conds(speaker_emb=spk, cond_prompt_speech_tokens=ptok, emotion_adv=emo,
                   clap_emb=None, cond_prompt_speech_emb=pemb),
        gen=GenConds(prompt_token=tok, prompt_token_len=tlen.reshape(1).long(), prompt_feat=feat,
                     embedding=emb, prompt_feat_len=flen),
    )


def load_voice(path: Union[str, Path], name: str = DEFAULT_VOICE,
               prompt_len: Optional[int] = T3_PROMPT_LEN) -> Voice:
    """Read a ``conds.pt``-format file with ``torch.load(weights_only=True)`` and validate it."""
    path = Path(path)
    if not path.is_file():
        raise _err(path, "voice file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated files, non-tensor objects
        raise _err(path, f"cannot be read as a voice file with torch.load(weights_only=True): {e}") from e
    return parse_voice(obj, path, name, prompt_len)


def save_voice(voice: Voice, path: Union[str, Path]) -> None:
    """Write ``voice`` in upstream's ``conds.pt`` format."""
    torch.save(voice.to_saved(), Path(path))


def list_voices(folder: Union[str, Path], voices_dir: Union[str, Path, None] = None) -> dict[str, Path]:
    """Voice name → file: ``default`` → ``<folder>/conds.pt`` (if present), then ``<voices_dir>/<name>.pt``.

    ``voices_dir`` defaults to ``<folder>/voices``; a missing voices folder means no extra voices.
    A file whose name is not a valid voice name, or a ``voices/default.pt``, is an error.
    """
    folder = Path(folder)
    vdir = Path(voices_dir) if voices_dir is not None else folder / "voices"
    out: dict[str, Path] = {}
    if (folder / "conds.pt").is_file():
        out[DEFAULT_VOICE] = folder / "conds.pt"
    if vdir.is_dir():
        for p in sorted(vdir.glob("*.pt")):
            name = p.stem
            if not _VOICE_NAME.match(name):
                raise VoiceError(f"{p}: {name!r} is not a valid voice name (letters, digits, '_', '.', '-'; at most 64)")
            if name == DEFAULT_VOICE:
                raise VoiceError(f"{p}: the name 'default' is reserved for {folder / 'conds.pt'}")
            out[name] = p
    elif voices_dir is not None:
        raise VoiceError(f"voices folder {vdir} does not exist")
    return out


def load_voices(folder: Union[str, Path], voices_dir: Union[str, Path, None] = None,
                prompt_len: Optional[int] = T3_PROMPT_LEN) -> dict[str, Voice]:
    """Every voice of :func:`list_voices`, loaded and validated. No voice at all is an error."""
    found = list_voices(folder, voices_dir)
    if not found:
        raise VoiceError(f"no voices: {Path(folder) / 'conds.pt'} is missing and no voices/<name>.pt were found")
    return {name: load_voice(p, name, prompt_len) for name, p in found.items()}


__all__ = ["DEFAULT_VOICE", "GenConds", "T3Conds", "Voice", "VoiceError", "list_voices", "load_voice",
           "load_voices", "parse_voice", "save_voice"]
