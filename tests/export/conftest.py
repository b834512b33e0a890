"""Fixtures for the export tests: a small T3 model folder with two voices, the exported tiny vocoder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from token_service.t3.config import T3Config
from token_service.t3.model import T3Model


def write_random_t3_folder(folder: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A T3-only model folder: random weights of ``preset`` (std 0.05), demo voices ``default`` and ``alt``."""
    cfg = T3Config.preset(preset)
    torch.manual_seed(seed)
    model = T3Model(cfg)
    for p in model.parameters():  # spread values so logits differ visibly between ids
        torch.nn.init.normal_(p, std=0.05)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / cfg.weights_file))
    from export.demo_checkpoint import demo_voice
    from tts_common.conds import save_voice

    save_voice(demo_voice(seed), folder / "conds.pt")
    (folder / "voices").mkdir(exist_ok=True)
    save_voice(demo_voice(seed + 1), folder / "voices" / "alt.pt")
    return folder


@pytest.fixture(scope="session")
def tiny_t3_dir(tmp_path_factory) -> Path:
    return write_random_t3_folder(tmp_path_factory.mktemp("tiny_t3"), "tiny")


@pytest.fixture(scope="session")
def vocoder_export(demo_tiny_dir, tmp_path_factory):
    """The tiny demo S3Gen exported to ONNX (checked under onnxruntime) + TensorRT scripts, once."""
    from export.s3gen_onnx import export_vocoder

    out = tmp_path_factory.mktemp("vocoder_onnx")
    return out, export_vocoder(demo_tiny_dir, out, check=True)
