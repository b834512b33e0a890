"""Text front end vs upstream: punc_norm and the tokenizer (AutoTokenizer, transformers 5.2.0)."""
from __future__ import annotations

import pytest

from token_service.t3.text import MAX_TEXT_TOKENS, TextError, TextTokenizer, normalize_text

CASES = [
    "hello world",
    "Hello   world ,  how are you",
    "It’s “quoted” and ‘single’…",
    "Wait — really – yes: no",
    "Already ends with a question?",
    "trailing dash -",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nhere",
    "ünïcödé ÉLAN 日本語 emoji 🙂",
    "[laugh] That was funny [chuckle] really.",
    "Say [clear throat] excuse me[sigh]",
    "a[laugh]b [whispering]quiet[advertisement]",
    "<|endoftext|> is a special token",
    "Numbers 1,234.56 and 3:45 pm!",
    "x",
    "...",
    "end with comma,",
    "Mr. Smith's dog—named 'Rex'—barked!",
]


@pytest.mark.upstream
@pytest.mark.parametrize("text", CASES + ["", " "])
def test_normalize_matches_upstream_punc_norm(text):
    from tests.upstream_oracle import upstream_module

    ref = upstream_module("tts_turbo").punc_norm(text)
    if not text.strip():
        with pytest.raises(TextError, match="empty|whitespace"):
            normalize_text(text)
        # documented difference: upstream speaks a canned sentence for empty input
        assert text == "" and ref.startswith("You need to add some text") or text.strip() == ""
    else:
        assert normalize_text(text) == ref


@pytest.mark.upstream
def test_token_ids_match_upstream_autotokenizer(demo_tiny_dir):
    from transformers import AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(demo_tiny_dir)
    if ref_tok.pad_token is None:  # as upstream's from_local does
        ref_tok.pad_token = ref_tok.eos_token
    assert len(ref_tok) == 50276
    ours = TextTokenizer(demo_tiny_dir)
    assert ours.vocab_size == 50276
    for text in CASES:
        norm = normalize_text(text)
        # exactly upstream generate's call
        ref = ref_tok(norm, return_tensors="pt", padding=True, truncation=True).input_ids[0].tolist()
        assert ours.tokenize(text) == ref, text
    assert ours.tokenize("[laugh]")[0] == 50257


def test_empty_and_too_long_text_raise(demo_tiny_dir):
    tok = TextTokenizer(demo_tiny_dir, max_tokens=20)
    with pytest.raises(TextError, match="empty"):
        tok.tokenize("")
    with pytest.raises(TextError, match="whitespace"):
        tok.tokenize(" \n\t")
    with pytest.raises(TextError, match=r"too long: \d+ tokens, the limit is 20"):
        tok.tokenize("word " * 30)
    assert TextTokenizer(demo_tiny_dir).max_tokens == MAX_TEXT_TOKENS


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        TextTokenizer(tmp_path)
