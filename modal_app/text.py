"""Split long text into chunks at sentence boundaries, so each chunk can be generated in one batch.

Chunks are slices of the original text (whitespace inside them is kept) and are balanced in
length: a 450-character text with a 400-character limit gives two chunks of about 225, not 400
and 50, because a batch runs as long as its longest member.
"""

import math
import re
from itertools import pairwise

# Written as escapes because most are look-alikes of ASCII punctuation.
_SENTENCE_ENDS = ".!?\u2026"  # and the ellipsis character
_CJK_SENTENCE_ENDS = "\u3002\uff01\uff1f"  # ideographic full stop, fullwidth ! and ?
_CLOSERS = "\"')\\]\u201d\u2019\u300d\u300f\uff09"  # quotes and brackets after a stop
_CJK_CLAUSE_BREAKS = "\uff0c\u3001\uff1b\uff1a"  # fullwidth comma, ideographic comma, ; and :

# Coarse to fine: sentence ends, then clause breaks, then spaces. Each level is only used
# inside a piece the coarser level left too long; past the last level the piece is cut hard.
_BREAKS = (
    re.compile(rf"[{_SENTENCE_ENDS}]+[{_CLOSERS}]*\s+|[{_CJK_SENTENCE_ENDS}]+[{_CLOSERS}]*\s*|\n+"),
    re.compile(rf"[,;:]\s+|[{_CJK_CLAUSE_BREAKS}]\s*"),
    re.compile(r"\s+"),
)


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Non-empty chunks of at most `max_chars` characters that together hold all of `text`."""
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    pieces = _pieces(text, 0, len(text), max_chars, level=0)
    return _pack(text, pieces, max_chars)


def _pieces(text: str, start: int, end: int, max_chars: int, level: int) -> list[tuple[int, int]]:
    """Contiguous spans covering text[start:end], each at most max_chars long."""
    if end - start <= max_chars:
        return [(start, end)]
    if level == len(_BREAKS):
        size = math.ceil((end - start) / math.ceil((end - start) / max_chars))
        return [(cut, min(cut + size, end)) for cut in range(start, end, size)]
    cuts = [match.end() for match in _BREAKS[level].finditer(text, start, end) if match.end() < end]
    spans: list[tuple[int, int]] = []
    for left, right in pairwise([start, *cuts, end]):
        spans.extend(_pieces(text, left, right, max_chars, level + 1))
    return spans


def _pack(text: str, pieces: list[tuple[int, int]], max_chars: int) -> list[str]:
    """Merge neighbouring spans into chunks of about equal length, never past max_chars."""
    chunks: list[str] = []
    start, end = pieces[0]
    for left, right in pieces[1:]:
        if _should_close(start, end, right, len(text), max_chars):
            chunks.append(text[start:end].strip())
            start = left
        end = right
    chunks.append(text[start:end].strip())
    return [chunk for chunk in chunks if chunk]


def _should_close(start: int, end: int, right: int, total: int, max_chars: int) -> bool:
    """Close the chunk text[start:end] rather than extend it to `right` when extending would
    overflow, or would land further from an even share of what is left than stopping does."""
    if right - start > max_chars:
        return True
    remaining = total - start
    target = remaining / math.ceil(remaining / max_chars)
    return abs(right - start - target) > abs(end - start - target)
