"""Model-folder reader: upstream's layout, strict on key names, shapes and dtypes.

A model folder (real weights from ``ResembleAI/chatterbox-turbo`` or a demo folder written by
``tts-export demo-checkpoint``) holds::

    t3_turbo_v1.safetensors | t3_nano_v1.safetensors   T3 (GPT-2 medium | small)
    s3gen_meanflow.safetensors                         S3Gen: flow.*, mel2wav.*, plus tokenizer.*
                                                       and speaker_encoder.* (voice cloning only)
    ve.safetensors                                     voice encoder (voice cloning only)
    conds.pt                                           the built-in voice "default"
    vocab.json merges.txt added_tokens.json            GPT-2 byte-level BPE + paralinguistic tags
    special_tokens_map.json tokenizer_config.json
    voices/<name>.pt                                   optional extra voices (conds.pt format)
    demo_checkpoint.json                               only in demo folders (never required)

Presets: ``turbo`` and ``nano`` are recognised from the T3 file name and width; ``tiny`` exists
only as a demo folder and is recognised from ``demo_checkpoint.json``.

Strictness: for ``turbo`` / ``nano`` the expected keys come from the manifests of upstream's
modules (``export/manifests/*.json``, written by ``tests/upstream/dump_manifests.py``); callers may
pass their own expectation (e.g. built from their module's ``state_dict()``), which is how the
``tiny`` preset is checked.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file

log = logging.getLogger(__name__)

PRESETS = ("turbo", "nano", "tiny")
T3_FILES = {"turbo": "t3_turbo_v1.safetensors", "nano": "t3_nano_v1.safetensors", "tiny": "t3_turbo_v1.safetensors"}
S3GEN_FILE = "s3gen_meanflow.safetensors"
VE_FILE = "ve.safetensors"
CONDS_FILE = "conds.pt"
VOICES_DIR = "voices"
DEMO_MARKER = "demo_checkpoint.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")
# S3Gen keys that serve voice cloning from audio only; split off, never loaded by the vocoder.
S3GEN_SKIPPED_PREFIXES = ("tokenizer.", "speaker_encoder.")
# T3 widths of the real presets (tfmr.wpe.weight is (n_positions, width)).
_WIDTH_TO_PRESET = {1024: "turbo", 768: "nano"}

# name -> (shape, dtype); dtype as torch.dtype or its name ("float32")
ExpectedSpec = Mapping[str, tuple[Sequence[int], Union[torch.dtype, str]]]

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A model folder or one of its files is not what the reader expects; the message says what."""


def _dtype(d: Union[torch.dtype, str]) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    out = getattr(torch, str(d).removeprefix("torch."), None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"not a torch dtype: {d!r}")
    return out


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def check_state_dict(actual: Mapping[str, torch.Tensor], expected: ExpectedSpec, file: Union[str, Path]) -> None:
    """Raise :class:`CheckpointError` unless ``actual`` has exactly the ``expected`` keys, shapes, dtypes.

    ``actual`` maps names to tensors (or anything with ``.shape`` and ``.dtype``); ``expected``
    maps names to ``(shape, dtype)``. The message names ``file`` and lists (up to 10 of) the
    missing, unexpected and mismatched keys, each mismatch with expected vs found shape / dtype.
    """
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    mismatched = []
    for k, (shape, dtype) in expected.items():
        if k not in actual:
            continue
        t = actual[k]
        want_shape, got_shape = tuple(int(s) for s in shape), tuple(int(s) for s in t.shape)
        want_dtype, got_dtype = _dtype(dtype), t.dtype
        if want_shape != got_shape:
            mismatched.append(f"{k}: shape {list(got_shape)}, expected {list(want_shape)}")
        elif want_dtype != got_dtype:
            mismatched.append(f"{k}: dtype {_dtype_name(got_dtype)}, expected {_dtype_name(want_dtype)}")
    if not (missing or unexpected or mismatched):
        return

    def few(items: list[str]) -> str:
        more = f" … and {len(items) - 10} more" if len(items) > 10 else ""
        return ", ".join(items[:10]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} mismatched: {few(mismatched)}")
    raise CheckpointError(f"{file}: " + "; ".join(parts))


def expected_from_module(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of a module's ``state_dict()`` (persistent parameters and buffers)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


@lru_cache(maxsize=None)
def manifest(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Upstream's expected keys for one file (``"t3_turbo_v1"``, ``"t3_nano_v1"``, ``"s3gen_meanflow"``, ``"ve"``).

    Read from ``export/manifests/<name>.json`` (dumped from upstream 0.1.7's modules).
    """
    path = resources.files("export").joinpath("manifests", f"{name}.json")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no manifest {name!r} (looked for {path})") from None
    return {k: (tuple(v["shape"]), _dtype(v["dtype"])) for k, v in data["keys"].items()}


def safetensors_header(path: Union[str, Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of a ``.safetensors`` file, without reading the tensor data."""
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return out


class _Spec:
    """Adapter so a header's ``(shape, dtype)`` pairs can be checked like tensors."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


@dataclass(frozen=True)
class S3GenState:
    """``s3gen_meanflow.safetensors`` split in two.

    ``model``: ``flow.*`` and ``mel2wav.*`` (what the vocoder loads strictly).
    ``skipped``: ``tokenizer.*`` and ``speaker_encoder.*`` (voice cloning from audio only; the
    baked-voice design does not run them). Kept here, not silently dropped.
    """

    model: dict[str, torch.Tensor]
    skipped: dict[str, torch.Tensor] = field(default_factory=dict)


def split_s3gen_state(state: Mapping[str, torch.Tensor]) -> S3GenState:
    """Split a full S3Gen state dict into ``model`` and the explicitly ``skipped`` prefixes."""
    model, skipped = {}, {}
    for k, v in state.items():
        (skipped if k.startswith(S3GEN_SKIPPED_PREFIXES) else model)[k] = v
    return S3GenState(model=model, skipped=skipped)


def _read_marker(path: Path) -> dict | None:
    marker = path / DEMO_MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{marker}: expected a JSON object")
    return data


def detect_preset(folder: Union[str, Path]) -> str:
    """``turbo`` | ``nano`` | ``tiny`` for a model folder; raises :class:`CheckpointError` otherwise.

    ``demo_checkpoint.json`` (demo folders only) names the preset; otherwise the T3 file name
    decides (``t3_nano_v1`` → nano), and ``t3_turbo_v1`` is checked to be 1024 wide.
    """
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist or is not a directory")
    marker = _read_marker(path)
    if marker is not None and "preset" in marker:
        preset = marker["preset"]
        if preset not in PRESETS:
            raise CheckpointError(
                f"{path / DEMO_MARKER}: unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        return preset
    has_turbo = (path / T3_FILES["turbo"]).is_file()
    has_nano = (path / T3_FILES["nano"]).is_file()
    if has_turbo and has_nano:
        raise CheckpointError(
            f"model folder {path} has both {T3_FILES['turbo']} and {T3_FILES['nano']}; keep only one")
    if not (has_turbo or has_nano):
        raise CheckpointError(
            f"model folder {path} has no T3 weights: expected {T3_FILES['turbo']} or {T3_FILES['nano']}")
    t3_file = path / (T3_FILES["nano"] if has_nano else T3_FILES["turbo"])
    header = safetensors_header(t3_file)
    if "tfmr.wpe.weight" not in header:
        raise CheckpointError(f"{t3_file}: missing key tfmr.wpe.weight (is this a T3 checkpoint?)")
    width = header["tfmr.wpe.weight"][0][1]
    preset = _WIDTH_TO_PRESET.get(width)
    if preset is None or T3_FILES[preset] != t3_file.name:
        raise CheckpointError(
            f"{t3_file}: unknown preset: T3 width {width} does not match "
            f"turbo (1024, {T3_FILES['turbo']}) or nano (768, {T3_FILES['nano']})")
    return preset


@dataclass(frozen=True)
class ModelFolder:
    """A model folder whose files exist; reads them on demand.

    ``ModelFolder.open(path)`` checks that every required file is present (the error names the
    missing file and the folder) and detects the preset. ``demo`` is the content of
    ``demo_checkpoint.json`` for demo folders, else ``None``.
    """

    path: Path
    preset: str
    demo: dict | None = None

    @classmethod
    def open(cls, folder: Union[str, Path], preset: str | None = None) -> "ModelFolder":
        """Open ``folder``; if ``preset`` is given it must match the detected one."""
        path = Path(folder).expanduser()
        if preset is not None and preset not in PRESETS:
            raise CheckpointError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        found = detect_preset(path)
        if preset is not None and preset != found:
            raise CheckpointError(f"model folder {path} holds a {found!r} model, not the requested {preset!r}")
        self = cls(path=path, preset=found, demo=_read_marker(path))
        for name in self.required_files():
            if not (path / name).is_file():
                raise CheckpointError(f"model folder {path} is missing {name}")
        return self

    @staticmethod
    def required_files_for(preset: str) -> tuple[str, ...]:
        return (T3_FILES[preset], S3GEN_FILE, VE_FILE, CONDS_FILE) + TOKENIZER_FILES

    def required_files(self) -> tuple[str, ...]:
        return self.required_files_for(self.preset)

    @property
    def is_demo(self) -> bool:
        return self.demo is not None

    @property
    def t3_file(self) -> Path:
        return self.path / T3_FILES[self.preset]

    @property
    def s3gen_file(self) -> Path:
        return self.path / S3GEN_FILE

    @property
    def ve_file(self) -> Path:
        return self.path / VE_FILE

    @property
    def conds_file(self) -> Path:
        return self.path / CONDS_FILE

    @property
    def voices_dir(self) -> Path:
        return self.path / VOICES_DIR

    def _expected(self, manifest_name: str, expected: ExpectedSpec | None) -> ExpectedSpec | None:
        if expected is not None:
            return expected
        if self.preset in ("turbo", "nano"):
            return manifest(manifest_name)
        return None  # tiny: only the caller's module knows its shapes

    def t3_state(self, expected: ExpectedSpec | None = None) -> dict[str, torch.Tensor]:
        """T3 state dict (upstream's keys), checked against ``expected`` or upstream's manifest."""
        want = self._expected(self.t3_file.stem, expected)
        if want is not None:  # check the header first: a clear error before reading 2 GB
            check_state_dict({k: _Spec(*v) for k, v in safetensors_header(self.t3_file).items()}, want, self.t3_file)
        return _load(self.t3_file)

    def s3gen_state(self, expected: ExpectedSpec | None = None) -> S3GenState:
        """S3Gen state split into ``model`` (flow.*, mel2wav.*) and ``skipped`` (tokenizer.*, speaker_encoder.*).

        ``expected`` (if given) describes the ``model`` part only, e.g. from the vocoder module's
        ``state_dict()``; without it turbo/nano folders are checked in full against upstream's
        manifest. The skipped keys are logged, never silently dropped.
        """
        header = {k: _Spec(*v) for k, v in safetensors_header(self.s3gen_file).items()}
        if expected is None:
            full = self._expected("s3gen_meanflow", None)
            if full is not None:
                check_state_dict(header, full, self.s3gen_file)
        else:
            check_state_dict(split_s3gen_state(header).model, expected, self.s3gen_file)
        state = split_s3gen_state(_load(self.s3gen_file))
        if state.skipped:
            prefixes = sorted({k.split(".", 1)[0] + ".*" for k in state.skipped})
            log.info("%s: %d voice-cloning keys (%s) set aside, not loaded by the vocoder",
                     self.s3gen_file, len(state.skipped), ", ".join(prefixes))
        return state

    def ve_state(self, expected: ExpectedSpec | None = None) -> dict[str, torch.Tensor]:
        """Voice-encoder state dict (voice cloning from audio only)."""
        want = expected if expected is not None else manifest("ve")
        check_state_dict({k: _Spec(*v) for k, v in safetensors_header(self.ve_file).items()}, want, self.ve_file)
        return _load(self.ve_file)

    def tokenizer_files(self) -> dict[str, Path]:
        """Paths of the tokenizer files, by file name."""
        return {name: self.path / name for name in TOKENIZER_FILES}




def t3_expected_shapes(n_layer: int, n_embd: int, n_positions: int = 8196, text_vocab: int = 50276,
                       speech_vocab: int = 6563, speaker_embed: int = 256) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Upstream's T3 (GPT-2 backbone) keys for a given shape, all float32, in upstream's order.

    Equal to upstream's manifests for turbo (24, 1024) and nano (12, 768) (tested); used for
    ``tiny``. GPT-2's ``Conv1D`` stores weights as (in, out).
    """
    f32 = torch.float32
    d = n_embd
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "tfmr.wte.weight": ((text_vocab, d), f32),
        "tfmr.wpe.weight": ((n_positions, d), f32),
    }
    for i in range(n_layer):
        p = f"tfmr.h.{i}."
        out.update({
            p + "ln_1.weight": ((d,), f32), p + "ln_1.bias": ((d,), f32),
            p + "attn.c_attn.weight": ((d, 3 * d), f32), p + "attn.c_attn.bias": ((3 * d,), f32),
            p + "attn.c_proj.weight": ((d, d), f32), p + "attn.c_proj.bias": ((d,), f32),
            p + "ln_2.weight": ((d,), f32), p + "ln_2.bias": ((d,), f32),
            p + "mlp.c_fc.weight": ((d, 4 * d), f32), p + "mlp.c_fc.bias": ((4 * d,), f32),
            p + "mlp.c_proj.weight": ((4 * d, d), f32), p + "mlp.c_proj.bias": ((d,), f32),
        })
    out.update({
        "tfmr.ln_f.weight": ((d,), f32), "tfmr.ln_f.bias": ((d,), f32),
        "cond_enc.spkr_enc.weight": ((d, speaker_embed), f32), "cond_enc.spkr_enc.bias": ((d,), f32),
        "text_emb.weight": ((text_vocab, d), f32),
        "speech_emb.weight": ((speech_vocab, d), f32),
        "text_head.weight": ((text_vocab, d), f32),
        "speech_head.weight": ((speech_vocab, d), f32), "speech_head.bias": ((speech_vocab,), f32),
    })
    return out


__all__ = [
    "PRESETS", "T3_FILES", "S3GEN_FILE", "VE_FILE", "CONDS_FILE", "VOICES_DIR", "DEMO_MARKER", "TOKENIZER_FILES",
    "S3GEN_SKIPPED_PREFIXES", "CheckpointError", "ModelFolder", "S3GenState", "check_state_dict",
    "detect_preset", "expected_from_module", "manifest", "safetensors_header", "split_s3gen_state",
    "t3_expected_shapes",
]
