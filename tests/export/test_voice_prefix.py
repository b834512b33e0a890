"""Voice prefix extraction: rows equal upstream's conditioning as the T3 engine computes it."""
from __future__ import annotations

import json

import pytest
import torch

from export.voice_prefix import compute_voice_prefix, extract_and_save_voice_prefix, load_t3_state_dict, \
    load_voice_prefix
from token_service.t3.model import T3Model
from token_service.t3.voice import load_voice_conds, prefix_embeds


def test_prefix_equals_t3_engine_and_metadata(tiny_t3_dir, tmp_path):
    meta = extract_and_save_voice_prefix(tiny_t3_dir, "default", tmp_path / "v" / "default.safetensors")
    prefix, meta2 = load_voice_prefix(meta["path"])
    assert meta2 == json.loads((tmp_path / "v" / "default.json").read_text())
    assert (meta["length"], meta["width"], meta["dtype"], meta["voice"]) == (376, 64, "float32", "default")
    assert meta["source_checkpoint"].endswith("t3_turbo_v1.safetensors") and len(meta["source_checkpoint_sha256"]) == 64
    sd, cfg = load_t3_state_dict(tiny_t3_dir)
    engine = prefix_embeds(T3Model.from_state_dict(sd, cfg), load_voice_conds(tiny_t3_dir / "conds.pt"))
    torch.testing.assert_close(prefix, engine, rtol=0, atol=0)


def test_voices_differ_and_bad_names_fail(tiny_t3_dir, tmp_path):
    sd, cfg = load_t3_state_dict(tiny_t3_dir)
    a = compute_voice_prefix(sd, tiny_t3_dir, "default", cfg)
    b = compute_voice_prefix(sd, tiny_t3_dir, "alt", cfg)
    assert a.shape == b.shape and not torch.equal(a[0], b[0]) and not torch.equal(a[1:], b[1:])
    with pytest.raises(FileNotFoundError, match="nobody"):
        compute_voice_prefix(sd, tiny_t3_dir, "nobody", cfg)
    with pytest.raises(ValueError, match="invalid voice name"):
        compute_voice_prefix(sd, tiny_t3_dir, "../x", cfg)
    with pytest.raises(ValueError, match="dtype"):
        extract_and_save_voice_prefix(tiny_t3_dir, "default", tmp_path / "x.safetensors", dtype="int8")
