"""The model-folder reader: presets, strictness, and errors that name the file and the key."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.demo_checkpoint import write_safetensors
from tts_common.checkpoint import (
    DEMO_MARKER, CheckpointError, ModelFolder, check_state_dict, detect_preset, expected_from_module,
    split_s3gen_state,
)


def _link_copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """A folder with the files of ``src`` (symlinked: cheap), minus ``skip``."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name not in skip:
            os.symlink(p, dst / p.name)
    return dst


@pytest.fixture
def tiny_copy(demo_tiny_dir, tmp_path) -> Path:
    return _link_copy(demo_tiny_dir, tmp_path / "tiny")


@pytest.fixture
def tiny_t3_expected():
    from token_service.t3.config import T3Config
    from token_service.t3.model import T3Model

    return expected_from_module(T3Model(T3Config.preset("tiny")))


def _rewrite_t3(folder: Path, edit) -> None:
    """Replace the folder's T3 file by an edited copy of its state dict."""
    path = folder / "t3_turbo_v1.safetensors"
    sd = load_file(str(path))
    edit(sd)
    path.unlink()
    save_file(sd, str(path))


def test_check_state_dict_accepts_exact_match():
    m = torch.nn.Linear(3, 2)
    check_state_dict(m.state_dict(), expected_from_module(m), "x.safetensors")


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd.pop("bias"), ["missing key", "bias"]),
    (lambda sd: sd.update(extra=torch.zeros(1)), ["unexpected key", "extra"]),
    (lambda sd: sd.update(weight=torch.zeros(3, 2)), ["weight: shape [3, 2], expected [2, 3]"]),
    (lambda sd: sd.update(weight=torch.zeros(2, 3, dtype=torch.float16)), ["weight: dtype float16, expected float32"]),
])
def test_check_state_dict_names_file_and_key(edit, words):
    m = torch.nn.Linear(3, 2)
    sd = dict(m.state_dict())
    edit(sd)
    with pytest.raises(CheckpointError) as e:
        check_state_dict(sd, expected_from_module(m), "some/file.safetensors")
    assert str(e.value).startswith("some/file.safetensors: ")
    for w in words:
        assert w in str(e.value)


def test_reads_tiny_folder(tiny_copy, tiny_t3_expected):
    folder = ModelFolder.open(tiny_copy)
    assert folder.preset == "tiny" and folder.demo["preset"] == "tiny"
    sd = folder.t3_state(tiny_t3_expected)
    assert set(sd) == set(tiny_t3_expected)
    assert folder.ve_state()["proj.weight"].shape == (256, 256)
    assert set(folder.tokenizer_files()) >= {"vocab.json", "merges.txt"}


@pytest.mark.parametrize("name", ["conds.pt", "s3gen_meanflow.safetensors", "ve.safetensors", "merges.txt",
                                  "tokenizer_config.json"])
def test_missing_file_names_file_and_folder(demo_tiny_dir, tmp_path, name):
    folder = _link_copy(demo_tiny_dir, tmp_path / "f", skip=(name,))
    with pytest.raises(CheckpointError, match=f"{folder} is missing {name}"):
        ModelFolder.open(folder)


def test_missing_t3_file(demo_tiny_dir, tmp_path):
    folder = _link_copy(demo_tiny_dir, tmp_path / "f", skip=("t3_turbo_v1.safetensors", DEMO_MARKER))
    with pytest.raises(CheckpointError, match="no T3 weights: expected t3_turbo_v1.safetensors or t3_nano_v1"):
        ModelFolder.open(folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        ModelFolder.open(tmp_path / "nowhere")


def test_missing_key_names_file_and_key(tiny_copy, tiny_t3_expected):
    _rewrite_t3(tiny_copy, lambda sd: sd.pop("tfmr.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError) as e:
        ModelFolder.open(tiny_copy).t3_state(tiny_t3_expected)
    msg = str(e.value)
    assert "t3_turbo_v1.safetensors" in msg and "missing key(s): tfmr.h.1.mlp.c_fc.bias" in msg


def test_wrong_shape_names_file_key_and_shapes(tiny_copy, tiny_t3_expected):
    _rewrite_t3(tiny_copy, lambda sd: sd.update({"speech_head.bias": torch.zeros(6562)}))
    with pytest.raises(CheckpointError, match=r"t3_turbo_v1.safetensors: .*speech_head.bias: shape \[6562\], expected \[6563\]"):
        ModelFolder.open(tiny_copy).t3_state(tiny_t3_expected)


def test_wrong_dtype_names_file_key_and_dtypes(tiny_copy, tiny_t3_expected):
    _rewrite_t3(tiny_copy, lambda sd: sd.update({"tfmr.ln_f.weight": sd["tfmr.ln_f.weight"].half()}))
    with pytest.raises(CheckpointError, match=r"t3_turbo_v1.safetensors: .*tfmr.ln_f.weight: dtype float16, expected float32"):
        ModelFolder.open(tiny_copy).t3_state(tiny_t3_expected)


def test_unexpected_key(tiny_copy, tiny_t3_expected):
    _rewrite_t3(tiny_copy, lambda sd: sd.update({"tfmr.h.2.ln_1.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): tfmr.h.2.ln_1.weight"):
        ModelFolder.open(tiny_copy).t3_state(tiny_t3_expected)


def test_corrupt_safetensors_is_named(tiny_copy):
    (tiny_copy / "ve.safetensors").unlink()
    (tiny_copy / "ve.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="ve.safetensors: not a readable safetensors file"):
        ModelFolder.open(tiny_copy).ve_state()


def test_unknown_preset_in_marker(tiny_copy):
    (tiny_copy / DEMO_MARKER).unlink()
    (tiny_copy / DEMO_MARKER).write_text(json.dumps({"preset": "huge"}))
    with pytest.raises(CheckpointError, match="unknown preset 'huge'; known presets: turbo, nano, tiny"):
        ModelFolder.open(tiny_copy)


def test_unknown_requested_preset_and_mismatch(tiny_copy):
    with pytest.raises(CheckpointError, match="unknown preset 'medium'"):
        ModelFolder.open(tiny_copy, preset="medium")
    with pytest.raises(CheckpointError, match="holds a 'tiny' model, not the requested 'turbo'"):
        ModelFolder.open(tiny_copy, preset="turbo")


def test_without_marker_tiny_width_is_an_unknown_preset(demo_tiny_dir, tmp_path):
    """Real folders have no marker: the T3 width decides, and 64 is no real preset."""
    folder = _link_copy(demo_tiny_dir, tmp_path / "f", skip=(DEMO_MARKER,))
    with pytest.raises(CheckpointError, match="unknown preset: T3 width 64"):
        detect_preset(folder)


def _header_only_t3(path: Path, width: int) -> None:
    write_safetensors(path, {"tfmr.wpe.weight": ((8196, width), torch.float32)},
                      lambda n, s, d: torch.zeros(s, dtype=d))


@pytest.mark.parametrize("file, width, preset", [("t3_turbo_v1.safetensors", 1024, "turbo"),
                                                 ("t3_nano_v1.safetensors", 768, "nano")])
def test_real_presets_detected_and_checked_against_upstream(demo_tiny_dir, tmp_path, file, width, preset):
    """No marker: turbo/nano from file name + width; then the upstream manifest is the expectation."""
    folder = _link_copy(demo_tiny_dir, tmp_path / "f", skip=(DEMO_MARKER, "t3_turbo_v1.safetensors"))
    _header_only_t3(folder / file, width)
    opened = ModelFolder.open(folder)
    assert opened.preset == preset and not opened.is_demo
    with pytest.raises(CheckpointError, match=rf"{file}: \d+ missing key\(s\): tfmr.wte.weight"):
        opened.t3_state()
    # the tiny S3Gen lacks upstream's keys (e.g. the voice-cloning tokenizer.*): named, strict
    with pytest.raises(CheckpointError, match=r"s3gen_meanflow.safetensors: \d+ missing key\(s\): tokenizer._mel_filters"):
        opened.s3gen_state()


def test_wrong_width_for_file_name(demo_tiny_dir, tmp_path):
    folder = _link_copy(demo_tiny_dir, tmp_path / "f", skip=(DEMO_MARKER, "t3_turbo_v1.safetensors"))
    _header_only_t3(folder / "t3_nano_v1.safetensors", 1024)
    with pytest.raises(CheckpointError, match="t3_nano_v1.safetensors: unknown preset: T3 width 1024"):
        ModelFolder.open(folder)


def test_both_t3_files_is_an_error(demo_tiny_dir, tmp_path):
    folder = _link_copy(demo_tiny_dir, tmp_path / "f", skip=(DEMO_MARKER,))
    _header_only_t3(folder / "t3_nano_v1.safetensors", 768)
    with pytest.raises(CheckpointError, match="has both t3_turbo_v1.safetensors and t3_nano_v1.safetensors"):
        ModelFolder.open(folder)


def test_s3gen_split_keeps_voice_cloning_keys_aside():
    sd = {"flow.a": torch.zeros(1), "mel2wav.b": torch.zeros(1), "tokenizer.c": torch.zeros(1),
          "speaker_encoder.d": torch.zeros(1)}
    state = split_s3gen_state(sd)
    assert set(state.model) == {"flow.a", "mel2wav.b"}
    assert set(state.skipped) == {"tokenizer.c", "speaker_encoder.d"}


def test_s3gen_state_checks_model_part(tiny_copy):
    from vocoder_service.s3gen.config import S3GenConfig
    from vocoder_service.s3gen.model import S3GenModel

    expected = expected_from_module(S3GenModel(S3GenConfig.preset("tiny")))
    assert set(ModelFolder.open(tiny_copy).s3gen_state(expected).model) == set(expected)
    expected.pop("flow.input_embedding.weight")
    with pytest.raises(CheckpointError, match=r"s3gen_meanflow.safetensors: 1 unexpected key\(s\): flow.input_embedding.weight"):
        ModelFolder.open(tiny_copy).s3gen_state(expected)


@pytest.mark.fullsize
def test_demo_turbo_without_marker_reads_like_a_real_folder(demo_turbo_dir, tmp_path, caplog):
    """The same files with no demo marker: preset turbo, every file matches upstream's manifest."""
    folder = ModelFolder.open(_link_copy(demo_turbo_dir, tmp_path / "real", skip=(DEMO_MARKER,)))
    assert folder.preset == "turbo" and not folder.is_demo
    assert len(folder.t3_state()) == 299
    with caplog.at_level("INFO", logger="tts_common.checkpoint"):
        state = folder.s3gen_state()
    assert all(k.startswith(("flow.", "mel2wav.")) for k in state.model)
    assert {k.split(".")[0] for k in state.skipped} == {"tokenizer", "speaker_encoder"}
    assert "voice-cloning keys" in caplog.text
    assert len(folder.ve_state()) == 16
