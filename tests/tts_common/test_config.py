"""Config from flags > TTS_* env > defaults, and the ARCHITECTURE.md table kept in step with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from token_service.config import TokenServiceConfig
from tts_common.config import ConfigError, build_parser, config_fields, load_config
from vocoder_service.config import VocoderServiceConfig

ROOT = Path(__file__).resolve().parents[2]


def test_precedence_flags_over_env_over_defaults():
    env = {"TTS_MODEL_DIR": "/env/model", "TTS_MAX_STREAMS": "9", "TTS_LOG_LEVEL": "debug"}
    cfg = load_config(TokenServiceConfig, ["--max-streams", "3"], env)
    assert cfg.model_dir == "/env/model" and cfg.max_streams == 3 and cfg.log_level == "DEBUG"
    assert cfg.listen == "0.0.0.0:50051" and cfg.vocoder_target == "localhost:50052"
    assert cfg.voices_dir is None  # = <model-dir>/voices, resolved by the loaders
    v = load_config(VocoderServiceConfig, [], {"TTS_MODEL_DIR": "/m"})
    assert v.listen == "0.0.0.0:50052" and v.max_streams == 128 and v.drain_seconds == 20.0


@pytest.mark.parametrize("argv, env, words", [
    ([], {}, "TTS_MODEL_DIR"),
    (["--model-dir", "m", "--max-streams", "many"], {}, "--max-streams"),
    (["--model-dir", "m"], {"TTS_ENGINE": "tensorflow"}, "pytorch, trtllm"),
    (["--model-dir", "m", "--max-streams", "0"], {}, "max_streams must be > 0"),
    (["--model-dir", "m", "--log-level", "LOUD"], {}, "log_level"),
    (["--model-dir", "m", "--engine", "trtllm"], {}, "TTS_ENGINE_DIR"),
])
def test_bad_settings_name_the_flag_and_variable(argv, env, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(TokenServiceConfig, argv, env)


def test_help_lists_env_and_defaults():
    text = build_parser(VocoderServiceConfig).format_help()
    assert "TTS_MAX_STREAMS" in text and "default: 128" in text and "onnxruntime" in text


def _table_rows() -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        m = re.match(r"\| `(TTS_[A-Z0-9_]+)` \| `(--[a-z0-9-]+)` \| (.*?) \| (.*?) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4))
    return rows


def test_architecture_table_matches_the_config_objects():
    rows = _table_rows()
    token = {f.env: f for f in config_fields(TokenServiceConfig)}
    vocoder = {f.env: f for f in config_fields(VocoderServiceConfig)}
    assert set(rows) == set(token) | set(vocoder)
    for env, (flag, tok_col, voc_col) in rows.items():
        for fields, col in ((token, tok_col), (vocoder, voc_col)):
            if env in fields:
                assert fields[env].flag == flag
                assert col != "–", f"{env} exists but the table says it does not"
            else:
                assert col == "–", f"{env} is in the table but not in the config object"

