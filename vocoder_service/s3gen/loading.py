"""Load the vocoder from a model folder: ``S3GenModel`` + the voices' S3Gen conditioning."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from tts_common.checkpoint import ModelFolder, expected_from_module
from tts_common.conds import load_voices

from .config import S3GenConfig
from .model import S3GenModel, VoiceCond


def load_vocoder(model_dir: Union[str, Path], voices_dir: Union[str, Path, None] = None,
                 device: Union[str, torch.device] = "cpu") -> tuple[S3GenModel, dict[str, VoiceCond]]:
    """-> (model in eval mode on ``device``, voice name -> VoiceCond). Strict on every key/shape."""
    folder = ModelFolder.open(model_dir)
    preset = "tiny" if folder.preset == "tiny" else "turbo"  # nano shares turbo's S3Gen
    model = S3GenModel(S3GenConfig.preset(preset))
    state = folder.s3gen_state(expected=expected_from_module(model))
    model.load_state_dict(state.model, strict=True)
    voices = load_voices(folder.path, voices_dir, prompt_len=None)
    conds = {name: VoiceCond.from_gen(v.gen.as_dict()) for name, v in voices.items()}
    return model.to(device).eval(), conds
