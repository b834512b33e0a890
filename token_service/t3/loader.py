"""Load T3 and its voices from a model folder (upstream's layout, read by ``tts_common``)."""
from __future__ import annotations

from pathlib import Path

from .config import PRESETS, T3Config
from .model import T3Model
from .voice import VoiceConds


def load_t3(model_dir: str | Path) -> T3Model:
    """Strictly load the folder's T3 weights (float32, on CPU, with ``tfmr.wte``/``text_head`` still there)."""
    from tts_common.checkpoint import ModelFolder

    folder = ModelFolder.open(model_dir)
    sd = folder.t3_state()
    preset = PRESETS.get(folder.preset)
    cfg = T3Config.from_state_dict(sd, n_head=preset.n_head if preset else None, name=folder.preset)
    try:
        return T3Model.from_state_dict({k: v.float() for k, v in sd.items()}, cfg)
    except ValueError as e:
        raise ValueError(f"{folder.t3_file}: {e}") from e


def load_voice_conds_all(model_dir: str | Path, voices_dir: str | Path | None = None,
                         prompt_len: int = 375) -> dict[str, VoiceConds]:
    """Every voice of the folder (``default`` = ``conds.pt``, plus ``voices/<name>.pt``)."""
    from tts_common.conds import load_voices

    loaded = load_voices(model_dir, voices_dir, prompt_len=prompt_len)
    return {n: VoiceConds(v.t3.speaker_emb, v.t3.cond_prompt_speech_tokens) for n, v in loaded.items()}
