"""Text front end: upstream's punctuation normalisation and the folder's GPT-2 BPE tokenizer.

:func:`normalize_text` behaves like upstream ``tts_turbo.punc_norm`` on every non-empty input
(capitalise the first letter, collapse whitespace, map LLM punctuation ``… : — – “ ” ‘ ’`` and
`` ,``, add a final ``.`` unless the text ends in ``. ! ? - ,``). One deliberate difference:
upstream turns ``""`` into a canned sentence ("You need to add some text for me to talk."); the
service must not speak words nobody sent, so empty (or whitespace-only) text raises
:class:`TextError` instead.

:class:`TextTokenizer` is built with the ``tokenizers`` library from ``vocab.json`` + ``merges.txt``
(byte-level BPE, no prefix space, no BOS/EOS added) plus the added tokens of
``tokenizer_config.json`` / ``added_tokens.json`` (the paralinguistic tags such as ``[laugh]``),
and gives the same ids as upstream's ``AutoTokenizer`` (tested on a table of cases).

Length: upstream calls the tokenizer with ``truncation=True``, silently cutting the text at the
tokenizer's ``model_max_length`` (1024 for GPT-2). We never cut: more than ``max_tokens`` ids
(default :data:`MAX_TEXT_TOKENS` = 1024, so everything upstream accepts uncut is accepted) raise
:class:`TextError`. The engine may set a lower limit from its KV-cache length.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

MAX_TEXT_TOKENS = 1024

_PUNCT_MAP = (
    ("…", ", "),
    (":", ","),
    ("—", "-"),
    ("–", "-"),
    (" ,", ","),
    ("“", '"'),
    ("”", '"'),
    ("‘", "'"),
    ("’", "'"),
)
_ENDINGS = (".", "!", "?", "-", ",")


class TextError(ValueError):
    """The text cannot be synthesised (empty, too long); the message says why."""


def normalize_text(text: str) -> str:
    """Upstream's ``punc_norm`` for non-empty text; raises :class:`TextError` for empty text."""
    if not isinstance(text, str):
        raise TextError(f"text must be a string, got {type(text).__name__}")
    if not text or not text.split():
        raise TextError("text is empty" if not text else "text is only whitespace")
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in _PUNCT_MAP:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(_ENDINGS):
        text += "."
    return text


class TextTokenizer:
    """GPT-2 byte-level BPE with the folder's added tokens, via the ``tokenizers`` library."""

    def __init__(self, model_dir: str | Path, max_tokens: int = MAX_TEXT_TOKENS):
        d = Path(model_dir)
        vocab, merges = d / "vocab.json", d / "merges.txt"
        for f in (vocab, merges):
            if not f.is_file():
                raise FileNotFoundError(f"tokenizer file missing: {f}")
        config = _read_json(d / "tokenizer_config.json")
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
        tok.decoder = decoders.ByteLevel()
        for token_id, spec in sorted(_added_tokens(d, config).items()):
            added = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                               lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                               normalized=spec.get("normalized", not spec.get("special", False)),
                               special=spec.get("special", False))
            tok.add_tokens([added])
            got = tok.token_to_id(spec["content"])
            if got != token_id:
                raise ValueError(f"{d}: added token {spec['content']!r} has id {token_id} in the tokenizer files "
                                 f"but {got} when rebuilt (vocab.json has {tok.get_vocab_size(False)} entries)")
        self._tok = tok
        self.max_tokens = max_tokens
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, normalized_text: str) -> list[int]:
        """Ids of already-normalised text, without limits (see :meth:`tokenize`)."""
        return self._tok.encode(normalized_text, add_special_tokens=False).ids

    def tokenize(self, text: str, max_tokens: int | None = None) -> list[int]:
        """``normalize_text`` + encode; raises :class:`TextError` on empty or over-long text."""
        limit = self.max_tokens if max_tokens is None else max_tokens
        ids = self.encode(normalize_text(text))
        if len(ids) > limit:
            raise TextError(f"text is too long: {len(ids)} tokens, the limit is {limit} "
                            f"(split it into sentences)")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def _added_tokens(d: Path, config: dict) -> dict[int, dict]:
    """Added tokens by id: ``tokenizer_config.json``'s ``added_tokens_decoder`` first, then
    ``added_tokens.json`` (``{content: id}``) for any not described there."""
    out: dict[int, dict] = {int(i): dict(spec) for i, spec in config.get("added_tokens_decoder", {}).items()}
    known = {spec["content"] for spec in out.values()}
    special_map = _read_json(d / "special_tokens_map.json")
    specials = {v["content"] if isinstance(v, dict) else v for v in special_map.values() if isinstance(v, (str, dict))}
    for content, token_id in _read_json(d / "added_tokens.json").items():
        if content not in known:
            out[int(token_id)] = {"content": content, "special": content in specials}
    return out
