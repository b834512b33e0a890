"""Voices: conds.pt loaded safely, validated with errors that name the file and the field."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from export.demo_checkpoint import demo_voice
from tts_common.conds import VoiceError, list_voices, load_voice, load_voices, save_voice


@pytest.fixture
def saved(tmp_path) -> dict:
    """A valid voice as upstream's ``Conditionals.save`` stores it (plain dicts)."""
    return demo_voice(3).to_saved()


def _write(tmp_path: Path, obj, name: str = "conds.pt") -> Path:
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_round_trip(tmp_path, saved):
    v = load_voice(_write(tmp_path, saved))
    assert v.name == "default"
    assert v.t3.speaker_emb.shape == (1, 256) and v.t3.speaker_emb.dtype == torch.float32
    assert v.t3.cond_prompt_speech_tokens.dtype == torch.int64
    assert v.t3.emotion_adv.shape == (1, 1, 1)
    assert v.gen.prompt_feat.shape == (1, 500, 80) and v.gen.prompt_token_len.tolist() == [250]
    assert set(v.gen.as_dict()) == {"prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding"}
    save_voice(v, tmp_path / "again.pt")
    w = load_voice(tmp_path / "again.pt")
    assert torch.equal(w.gen.prompt_feat, v.gen.prompt_feat)


def test_accepts_int32_tokens_and_float_emotion(tmp_path, saved):
    saved["t3"]["cond_prompt_speech_tokens"] = saved["t3"]["cond_prompt_speech_tokens"].int()
    saved["gen"]["prompt_token_len"] = torch.tensor([250], dtype=torch.int32)
    saved["t3"]["emotion_adv"] = 0.5
    v = load_voice(_write(tmp_path, saved))
    assert v.t3.cond_prompt_speech_tokens.dtype == torch.int64 and v.t3.emotion_adv.item() == 0.5


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["t3"].update(speaker_emb=torch.zeros(1, 255)), r"t3.speaker_emb has shape \(1, 255\), expected \(1, 256\)"),
    (lambda d: d["t3"].pop("speaker_emb"), "missing t3.speaker_emb"),
    (lambda d: d["t3"].update(cond_prompt_speech_tokens=torch.zeros(1, 150, dtype=torch.long)),
     r"t3.cond_prompt_speech_tokens has shape \(1, 150\), expected \(1, 375\)"),
    (lambda d: d["t3"].update(cond_prompt_speech_tokens=torch.zeros(1, 375)),
     "t3.cond_prompt_speech_tokens has dtype torch.float32, expected an integer tensor"),
    (lambda d: d["t3"]["cond_prompt_speech_tokens"].__setitem__((0, 5), 6561),
     r"t3.cond_prompt_speech_tokens has ids outside \[0, 6561\)"),
    (lambda d: d["t3"].update(clap_emb=torch.zeros(1, 512)), "t3.clap_emb is set"),
    (lambda d: d["t3"].update(mystery=1), r"unknown t3 field\(s\) \['mystery'\]"),
    (lambda d: d["gen"].update(prompt_feat=torch.zeros(1, 499, 80)), r"gen.prompt_feat has shape \(1, 499, 80\), expected \(1, 500, 80\)"),
    (lambda d: d["gen"].update(prompt_token_len=torch.tensor([200])), "gen.prompt_token_len is 200, but gen.prompt_token has 250 tokens"),
    (lambda d: d["gen"].update(embedding=torch.zeros(1, 192, dtype=torch.long)), "gen.embedding has dtype torch.int64, expected a floating-point"),
    (lambda d: d["gen"]["prompt_feat"].__setitem__((0, 0, 0), float("nan")), "gen.prompt_feat contains NaN or inf"),
    (lambda d: d["gen"].pop("embedding"), "missing gen.embedding"),
    (lambda d: d["gen"].update(prompt_feat_len=torch.tensor([7])), "gen.prompt_feat_len must be None or the integer 500"),
    (lambda d: d.pop("gen"), "not a voice file: expected a dict with 't3' and 'gen'"),
])
def test_invalid_voice_names_file_and_field(tmp_path, saved, edit, message):
    edit(saved)
    path = _write(tmp_path, saved)
    with pytest.raises(VoiceError, match=message) as e:
        load_voice(path)
    assert str(e.value).startswith(f"{path}: ")


class Payload:  # pickled objects other than tensors/containers are refused by weights_only=True
    pass


def test_unsafe_or_unreadable_files_are_refused(tmp_path, saved):
    saved["t3"]["speaker_emb"] = Payload()
    with pytest.raises(VoiceError, match="cannot be read as a voice file with torch.load\\(weights_only=True\\)"):
        load_voice(_write(tmp_path, saved))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(VoiceError, match="junk.pt: cannot be read"):
        load_voice(tmp_path / "junk.pt")
    with pytest.raises(VoiceError, match="missing.pt: voice file not found"):
        load_voice(tmp_path / "missing.pt")


def test_list_and_load_voices(tmp_path, saved):
    _write(tmp_path, saved)
    (tmp_path / "voices").mkdir()
    other = copy.deepcopy(saved)
    other["gen"]["embedding"] = other["gen"]["embedding"] * 2
    _write(tmp_path / "voices", other, "alice.pt")
    _write(tmp_path / "voices", other, "bob-2.pt")
    assert list(list_voices(tmp_path)) == ["default", "alice", "bob-2"]
    voices = load_voices(tmp_path)
    assert voices["alice"].name == "alice"
    assert torch.equal(voices["alice"].gen.embedding, voices["default"].gen.embedding * 2)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _write(elsewhere, other, "carol.pt")
    assert list(list_voices(tmp_path, voices_dir=elsewhere)) == ["default", "carol"]
    with pytest.raises(VoiceError, match="voices folder .*nope does not exist"):
        list_voices(tmp_path, voices_dir=tmp_path / "nope")


def test_voice_name_rules(tmp_path, saved):
    (tmp_path / "voices").mkdir()
    _write(tmp_path / "voices", saved, "default.pt")
    with pytest.raises(VoiceError, match="the name 'default' is reserved"):
        list_voices(tmp_path)
    (tmp_path / "voices" / "default.pt").unlink()
    _write(tmp_path / "voices", saved, "bad name.pt")
    with pytest.raises(VoiceError, match="'bad name' is not a valid voice name"):
        list_voices(tmp_path)


def test_no_voice_at_all(tmp_path):
    with pytest.raises(VoiceError, match="no voices"):
        load_voices(tmp_path)


def test_a_bad_extra_voice_is_named(tmp_path, saved):
    _write(tmp_path, saved)
    (tmp_path / "voices").mkdir()
    bad = copy.deepcopy(saved)
    bad["gen"]["prompt_feat"] = bad["gen"]["prompt_feat"][:, :10]
    _write(tmp_path / "voices", bad, "broken.pt")
    with pytest.raises(VoiceError, match=r"broken.pt: gen.prompt_feat has shape"):
        load_voices(tmp_path)


@pytest.mark.upstream
def test_upstream_reads_our_voice_file(tmp_path, saved):
    from tests.upstream_oracle import upstream_module

    path = _write(tmp_path, saved)
    conds = upstream_module("tts_turbo").Conditionals.load(path)
    assert torch.equal(conds.t3.cond_prompt_speech_tokens, saved["t3"]["cond_prompt_speech_tokens"])
    assert torch.equal(conds.gen["prompt_feat"], saved["gen"]["prompt_feat"])
