"""``python -m token_service generate`` on the tiny demo folder."""
from __future__ import annotations

import json
import subprocess
import sys

from token_service.t3.generate import stream_speech_tokens
from token_service.t3.loader import load_t3, load_voice_conds_all
from token_service.t3.sampling import SamplingParams
from token_service.t3.text import TextTokenizer
from token_service.t3.voice import build_voice_prefix


def _run(*args):
    return subprocess.run([sys.executable, "-m", "token_service", *args], capture_output=True, text=True, timeout=120)


def test_generate_prints_the_tokens_as_json(demo_tiny_dir):
    r = _run("generate", "--model", str(demo_tiny_dir), "--text", "hello world [laugh]", "--max-new-tokens", "25",
             "--seed", "7", "--top-k", "50", "--temperature", "0.9")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    model = load_t3(demo_tiny_dir).drop_unused()
    prefix = build_voice_prefix(model, load_voice_conds_all(demo_tiny_dir)["default"])
    ids = TextTokenizer(demo_tiny_dir).tokenize("hello world [laugh]")
    want = list(stream_speech_tokens(model, prefix, ids, SamplingParams(seed=7, max_new_tokens=25, top_k=50,
                                                                        temperature=0.9)))
    assert got == want and len(got) <= 25


def test_generate_errors_are_readable(demo_tiny_dir, tmp_path):
    r = _run("generate", "--model", str(tmp_path / "nope"), "--text", "hi")
    assert r.returncode != 0 and "nope" in r.stderr
    r = _run("generate", "--model", str(demo_tiny_dir), "--text", "")
    assert r.returncode == 2 and "text is empty" in r.stderr
    r = _run("generate", "--model", str(demo_tiny_dir), "--text", "hi", "--voice", "bob")
    assert r.returncode == 2 and "unknown voice 'bob'" in r.stderr
