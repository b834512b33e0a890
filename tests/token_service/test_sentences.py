"""Incremental sentence splitting: sentences are released as soon as they are complete."""

from token_service.sentences import SentenceSplitter, split_sentences


def test_streamed_pieces_release_complete_sentences_early():
    s = SentenceSplitter()
    assert s.feed("Hello wor") == []
    assert s.feed("ld. How are") == ["Hello world."]
    assert s.feed(" you? ") == ["How are you?"]  # terminal punctuation + space: no need to wait
    assert s.feed("Dr. ") == []                 # an abbreviation is not a sentence end
    assert s.feed("Smith is here") == []
    assert s.flush() == ["Dr. Smith is here"]
    assert s.flush() == []


def test_whole_text_and_long_runs():
    assert split_sentences("One. Two! Three?") == ["One.", "Two!", "Three?"]
    parts = split_sentences("word, " * 200, max_chars=100)
    assert all(len(p) <= 100 for p in parts) and "".join(p.replace(" ", "") for p in parts) == "word," * 200
    assert split_sentences("   ") == []
