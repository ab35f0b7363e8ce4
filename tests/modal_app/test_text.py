import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modal_app.text import chunk_text

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."  # 64 characters


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_short_text_is_one_chunk_without_outer_whitespace() -> None:
    assert chunk_text("  Hello there.  ", 100) == ["Hello there."]


def test_blank_text_has_no_chunks() -> None:
    assert chunk_text(" \n ", 100) == []


def test_long_text_breaks_at_sentence_ends_into_balanced_chunks() -> None:
    text = " ".join([SENTENCE] * 7)  # 454 characters

    chunks = chunk_text(text, 200)

    assert len(chunks) == 3
    assert all(chunk.endswith(".") for chunk in chunks)
    lengths = sorted(len(chunk) for chunk in chunks)
    assert lengths[-1] - lengths[0] <= len(SENTENCE) + 1  # one sentence apart at most
    assert " ".join(chunks) == text


def test_chinese_sentences_break_after_ideographic_stops() -> None:
    text = "\u4f60\u597d\u3002\u6211\u5f88\u597d\uff01\u8c22\u8c22\u4f60\u3002" * 10  # no spaces

    chunks = chunk_text(text, 40)

    assert all(len(chunk) <= 40 for chunk in chunks)
    assert all(chunk[-1] in "\u3002\uff01" for chunk in chunks)
    assert "".join(chunks) == text


def test_sentence_longer_than_the_limit_breaks_at_commas_then_spaces() -> None:
    clauses = ", ".join(["one two three four five six"] * 6) + "."

    chunks = chunk_text(clauses, 60)

    assert all(len(chunk) <= 60 for chunk in chunks)
    assert all(chunk.endswith((",", ".")) for chunk in chunks)
    assert squeeze("".join(chunks)) == squeeze(clauses)


def test_unbroken_text_is_cut_into_equal_pieces() -> None:
    assert [len(chunk) for chunk in chunk_text("a" * 1000, 300)] == [250, 250, 250, 250]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        chunk_text("text", 0)


@given(
    text=st.text(alphabet=st.sampled_from("ab .,!?\n\u3002"), max_size=400),
    limit=st.integers(1, 80),
)
def test_chunks_fit_the_limit_and_keep_every_character(text: str, limit: int) -> None:
    chunks = chunk_text(text, limit)

    assert all(0 < len(chunk) <= limit for chunk in chunks)
    assert squeeze("".join(chunks)) == squeeze(text)
