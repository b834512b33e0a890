"""Loading T3 and voices from model folders: presets, and errors that name the problem."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from token_service.t3.config import T3Config
from token_service.t3.generate import stream_speech_tokens
from token_service.t3.loader import load_t3, load_voice_conds_all
from token_service.t3.sampling import SamplingParams
from token_service.t3.voice import build_voice_prefix


def test_tiny_folder_loads_as_tiny_preset(demo_tiny_dir):
    model = load_t3(demo_tiny_dir)
    assert model.cfg == T3Config.preset("tiny")
    assert "tfmr.wte.weight" in model.state_dict()
    model.drop_unused()
    assert "tfmr.wte.weight" not in model.state_dict() and "text_head.weight" not in model.state_dict()


def test_missing_t3_file_is_named(demo_tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(demo_tiny_dir, d)
    (d / "t3_turbo_v1.safetensors").unlink()
    with pytest.raises(Exception, match="t3_turbo_v1.safetensors"):
        load_t3(d)


def test_wrong_shape_names_file_and_key(demo_tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(demo_tiny_dir, d)
    sd = load_file(d / "t3_turbo_v1.safetensors")
    sd["speech_head.bias"] = torch.zeros(100)
    save_file(sd, d / "t3_turbo_v1.safetensors")
    with pytest.raises(ValueError, match=r"t3_turbo_v1.safetensors.*speech_head.bias.*\(100,\)"):
        load_t3(d)


def test_broken_voice_is_named(demo_tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(demo_tiny_dir, d)
    obj = torch.load(d / "conds.pt", weights_only=True)
    obj["t3"]["cond_prompt_speech_tokens"] = obj["t3"]["cond_prompt_speech_tokens"][:, :10]
    torch.save(obj, d / "conds.pt")
    with pytest.raises(ValueError, match="conds.pt.*cond_prompt_speech_tokens"):
        load_voice_conds_all(d)


@pytest.mark.fullsize
def test_nano_folder_runs(demo_nano_dir):
    model = load_t3(demo_nano_dir).drop_unused()
    assert (model.cfg.name, model.cfg.n_layer, model.cfg.n_embd, model.cfg.n_head) == ("nano", 12, 768, 12)
    prefix = build_voice_prefix(model, load_voice_conds_all(demo_nano_dir)["default"])
    assert prefix.embeds.shape == (376, 768)
    out = list(stream_speech_tokens(model, prefix, [40, 1842, 13], SamplingParams(seed=0, max_new_tokens=4)))
    assert len(out) <= 4 and all(0 <= t < 6561 for t in out)
