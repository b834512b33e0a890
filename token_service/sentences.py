"""Incremental sentence splitting of streamed text (pysbd), so synthesis starts before the input ends.

    splitter = SentenceSplitter()
    splitter.feed("Hello wor")      # -> []
    splitter.feed("ld. How are")    # -> ["Hello world."]
    splitter.flush()                # -> ["How are"]

A sentence is released as soon as pysbd puts a boundary after it. Text that ends in terminal
punctuation plus whitespace ("Hello world. ") is released without waiting for the next piece: we ask
pysbd whether a following capitalised word would start a new sentence (so "Dr. " is kept waiting).
A run of text longer than ``max_chars`` without a boundary is cut at the last comma or space, so one
endless "sentence" cannot exceed the tokenizer's limit or hold back audio forever.
"""

from __future__ import annotations

import pysbd

_TERMINAL = (".", "!", "?", "…", '"', "'", ")")


class SentenceSplitter:
    """Buffers text pieces and returns the sentences they complete (stripped, never empty)."""

    def __init__(self, max_chars: int = 300, language: str = "en"):
        self.max_chars = max_chars
        self._segmenter = pysbd.Segmenter(language=language, clean=False, char_span=True)
        self._buffer = ""

    @property
    def pending(self) -> str:
        """Text received but not yet released as a sentence."""
        return self._buffer

    def feed(self, piece: str) -> list[str]:
        """Add a text piece; returns the sentences it completed, in order."""
        self._buffer += piece
        out: list[str] = []
        while True:
            cut = self._boundary()
            if cut is None:
                break
            sentence, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:]
            if sentence:
                out.append(sentence)
        return out

    def flush(self) -> list[str]:
        """Release whatever is buffered as a sentence (on a client flush or the end of input)."""
        sentence, self._buffer = self._buffer.strip(), ""
        return [sentence] if sentence else []

    def _boundary(self) -> int | None:
        """Index in the buffer where the first complete sentence ends, or None."""
        text = self._buffer
        if not text.strip():
            return None
        spans = self._segmenter.segment(text)
        if len(spans) > 1:
            return spans[1].start
        if text[-1].isspace() and text.rstrip().endswith(_TERMINAL):
            probe = self._segmenter.segment(text + "Then")
            if len(probe) > 1 and probe[-1].start >= len(text.rstrip()):
                return len(text)
        if len(text) > self.max_chars:
            head = text[: self.max_chars]
            cut = max(head.rfind(", "), head.rfind("; "))
            cut = cut + 1 if cut > 0 else head.rfind(" ")
            return cut if cut > 0 else self.max_chars
        return None


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """All sentences of a complete text."""
    splitter = SentenceSplitter(max_chars)
    return splitter.feed(text) + splitter.flush()
