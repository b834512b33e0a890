"""TensorRT-LLM checkpoint writer and its independent validation (tiny preset; one full-size check)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from export.pipeline import export_trtllm, full_export_pipeline
from export.trtllm_checkpoint import BuildLimits, build_engine_script, request_input_ids
from export.validate import main as validate_main, print_validation_report, run_all_tests
from export.voice_prefix import load_t3_state_dict


@pytest.fixture(scope="module")
def ckpt(tiny_t3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trtllm")
    export_trtllm(tiny_t3_dir, "default", out, BuildLimits(max_batch_size=8, max_text_tokens=100,
                                                           max_new_tokens=300, dtype="float16"))
    return out


def test_layout_names_and_transposes(ckpt, tiny_t3_dir):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architecture"] == "GPTForCausalLM" and cfg["position_embedding_type"] == "learned_absolute"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["dtype"]) == (56839, 64, 2, "float16")
    w = load_file(str(ckpt / "rank0.safetensors"))
    sd, _ = load_t3_state_dict(tiny_t3_dir)
    assert torch.equal(w["transformer.layers.1.attention.qkv.weight"], sd["tfmr.h.1.attn.c_attn.weight"].t().half())
    assert torch.equal(w["transformer.layers.0.mlp.proj.weight"], sd["tfmr.h.0.mlp.c_proj.weight"].t().half())
    assert torch.equal(w["transformer.vocab_embedding.weight"][50276:], sd["speech_emb.weight"].half())
    assert torch.equal(w["lm_head.weight"][50276:], sd["speech_head.weight"].half())
    assert not w["lm_head.weight"][:50276].any()
    bias = np.load(ckpt / "embedding_bias.npy")
    assert np.array_equal(bias[50276:], sd["speech_head.bias"].numpy()) and (bias[:50276] <= -1e8).all()


def test_prompt_tables_and_runtime_meta(ckpt):
    meta = json.loads((ckpt / "t3_trtllm.json").read_text())
    assert meta["end_id"] == 50276 + 6562 and meta["prefix_len"] == 376
    assert sorted(meta["voices"]) == ["alt", "default"]
    t0 = np.load(ckpt / "prompt_table.npz")["prompt_table"]
    assert t0.shape == (1, 376, 64) and t0.dtype == np.float16
    assert np.array_equal(t0, np.load(ckpt / "prompt_tables" / "default.npz")["prompt_table"])
    assert not np.array_equal(t0, np.load(ckpt / "prompt_tables" / "alt.npz")["prompt_table"])
    ids = request_input_ids(meta, [1, 2, 3])
    assert ids[:376] == list(range(56839, 56839 + 376)) and ids[376:] == [1, 2, 3, 50276 + 6561]
    with pytest.raises(ValueError, match="text ids outside"):
        request_input_ids(meta, [50276])


def test_build_script_flags(ckpt):
    script = (ckpt / "build_engine.sh").read_text()
    for flag in ("trtllm-build", "--max_prompt_embedding_table_size 3008", "--use_paged_context_fmha enable",
                 "--gemm_plugin float16", "--max_batch_size 8", "--max_input_len 477", "--max_seq_len 777",
                 "--paged_kv_cache enable", "--remove_input_padding enable"):
        assert flag in script, flag
    assert subprocess.run(["bash", "-n", str(ckpt / "build_engine.sh")]).returncode == 0
    from export.t3_for_trt import T3ForTRTConfig
    with pytest.raises(ValueError, match="exceeds the model's 8196 positions"):
        build_engine_script("c", "e", T3ForTRTConfig(), BuildLimits(max_text_tokens=4000, max_new_tokens=4000))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        build_engine_script("c", "e", T3ForTRTConfig(), BuildLimits(dtype="int8"))


def test_validation_passes(ckpt, capsys):
    results = run_all_tests(ckpt)
    assert print_validation_report(results), capsys.readouterr().out
    parity = next(r for r in results if r.name == "logits vs T3 engine")
    assert parity.passed and "argmax agree 100%" in parity.detail
    assert validate_main(["--checkpoint_dir", str(ckpt), "--prompt_table", str(ckpt / "prompt_table.npz")]) == 0


def test_bfloat16_checkpoint_validates(tiny_t3_dir, tmp_path):
    export_trtllm(tiny_t3_dir, "alt", tmp_path, BuildLimits(dtype="bfloat16", max_batch_size=2))
    assert load_file(str(tmp_path / "rank0.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    assert np.load(tmp_path / "prompt_table.npz")["prompt_table"].dtype == np.float32  # numpy has no bf16
    assert "--gemm_plugin bfloat16" in (tmp_path / "build_engine.sh").read_text()
    results = run_all_tests(tmp_path, model_dir=tiny_t3_dir, voice="alt")
    assert all(r.passed for r in results), [(r.name, r.detail) for r in results if not r.passed]


def _corrupt(src, dst, fn):
    import shutil
    shutil.copytree(src, dst)
    w = load_file(str(dst / "rank0.safetensors"))
    fn(w)
    save_file(w, str(dst / "rank0.safetensors"))
    return dst


def test_validation_catches_wrong_qkv_layout(ckpt, tmp_path):
    def untransposed(w):  # store Conv1D layout (in, out) instead of Linear (out, in) for one square weight
        k = "transformer.layers.0.attention.dense.weight"
        w[k] = w[k].t().contiguous()
    bad = _corrupt(ckpt, tmp_path / "bad", untransposed)
    results = {r.name: r for r in run_all_tests(bad)}
    assert not results["logits vs T3 engine"].passed and results["tensor names/shapes/dtypes"].passed
    assert validate_main(["--checkpoint_dir", str(bad)]) == 1


def test_validation_catches_table_and_vocab_problems(ckpt, tmp_path):
    short = tmp_path / "short.npz"
    np.savez(short, prompt_table=np.zeros((1, 10, 64), np.float16))
    r = {x.name: x for x in run_all_tests(ckpt, short)}
    assert not r["prompt table"].passed and "(10, 64)" in r["prompt table"].detail
    bad = _corrupt(ckpt, tmp_path / "bad2", lambda w: w["lm_head.weight"][0].fill_(1.0))
    r = {x.name: x for x in run_all_tests(bad)}
    assert not r["vocabulary ranges"].passed and "text rows" in r["vocabulary ranges"].detail
    missing = _corrupt(ckpt, tmp_path / "bad3", lambda w: w.pop("transformer.ln_f.bias"))
    r = {x.name: x for x in run_all_tests(missing)}
    assert not r["tensor names/shapes/dtypes"].passed and "transformer.ln_f.bias" in r["tensor names/shapes/dtypes"].detail


def test_cli_module_exit_code(ckpt):
    proc = subprocess.run([sys.executable, "-m", "export.validate", "--checkpoint_dir", str(ckpt)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checks passed: OK" in proc.stdout


@pytest.mark.fullsize
@pytest.mark.parametrize("preset", ["turbo", "nano"])
def test_fullsize_checkpoint_matches_t3(preset, request, tmp_path):
    """Full-size demo checkpoints (GPT-2 medium / small): float16 TensorRT-LLM checkpoint vs T3 logits."""
    model_dir = request.getfixturevalue(f"demo_{preset}_dir")
    export_trtllm(model_dir, "default", tmp_path, BuildLimits(dtype="float16"))
    results = run_all_tests(tmp_path)
    assert print_validation_report(results)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == ((24, 1024) if preset == "turbo" else (12, 768))


def test_full_export_pipeline_writes_everything(demo_tiny_dir, tmp_path):
    report = full_export_pipeline(demo_tiny_dir, "default", tmp_path, validate=False,
                                  limits=BuildLimits(max_batch_size=2, max_text_tokens=32, max_new_tokens=64))
    paths = report["paths"]
    for key in ("voice_prefix", "trtllm.weights", "trtllm.prompt_table", "trtllm.build_script",
                "vocoder.flow_encoder", "vocoder.hift_decoder", "vocoder.tensorrt.trtexec_script", "report"):
        assert Path(paths[key]).is_file(), key
    saved = json.loads((tmp_path / "export_report.json").read_text())
    assert saved["voice"] == "default" and set(saved["seconds"]) == {"voice_prefix", "trtllm", "vocoder"}


def test_tts_export_cli(tiny_t3_dir, tmp_path, capsys):
    from export.cli import main
    assert main(["voice-prefix", "--model-dir", str(tiny_t3_dir), "--voice", "alt",
                 "--output", str(tmp_path / "alt.safetensors")]) == 0
    assert (tmp_path / "alt.json").is_file()
    assert main(["trtllm", "--model-dir", str(tiny_t3_dir), "--output-dir", str(tmp_path / "t"),
                 "--max-batch-size", "2", "--max-text-tokens", "50", "--max-new-tokens", "100", "--validate"]) == 0
    out = capsys.readouterr().out
    assert "build_script\t" in out and "checks passed: OK" in out
    assert "--max_batch_size 2" in (tmp_path / "t" / "build_engine.sh").read_text()
    assert main(["trtllm", "--model-dir", str(tiny_t3_dir), "--voice", "nobody", "--output-dir",
                 str(tmp_path / "u")]) == 2  # clear error, non-zero status
    assert "nobody" in capsys.readouterr().err
