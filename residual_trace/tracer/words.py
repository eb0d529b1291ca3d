"""Finding a word's tokens in a text: whole words only, by character offsets.

A word is found where it stands as a word in the text (not inside another word: in "The
doghouse and the dog." the word ``dog`` is the fifth word, never the first piece of
"doghouse"): case-sensitively for a cased tokenizer; for an uncased one (which lower-cases
the text itself) case-sensitively first and, when that finds nothing, ignoring case. Its
tokens are those whose characters (the tokenizer's offset mapping, leading spaces set aside)
overlap the word; a token that also
covers characters of a neighbouring word makes the word unusable as a span, with an error
that says so.

Examples:
    >>> text = "The doghouse and the dog."
    >>> offsets = [None, (0, 3), (4, 7), (7, 12), (13, 16), (17, 20), (21, 24), (24, 25), None]
    >>> word_spans(text, offsets, "dog")
    [(6, 7)]
    >>> is_whole_word(text, offsets, 2, 3)  # "dog" of "doghouse"
    False
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from residual_trace.errors import UserError

#: Character offsets of each token in its text; ``None`` for special and added tokens.
Offsets = Sequence[tuple[int, int] | None]


def _trimmed(text: str, span: tuple[int, int]) -> tuple[int, int]:
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    return start, end


def _matches(text: str, word: str, uncased: bool) -> list[tuple[int, int]]:
    pattern = r"(?<!\w)" + re.escape(word) + r"(?!\w)"
    found = [m.span() for m in re.finditer(pattern, text)]
    if found or not uncased:
        return found
    return [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def word_spans(
    text: str, offsets: Offsets, word: str, uncased: bool = False
) -> list[tuple[int, int]]:
    """The ``[start, end)`` token spans of every whole-word occurrence of ``word`` in ``text``.

    In order; ``[]`` when it does not occur or its tokens were truncated away.

    Raises :class:`UserError` when an occurrence shares a token with a neighbouring word.
    """
    word = word.strip()
    if not word:
        raise UserError("an empty word cannot be looked up")
    spans = []
    for start, end in _matches(text, word, uncased):
        tokens = [
            k
            for k, span in enumerate(offsets)
            if span is not None
            and _trimmed(text, span)[0] < end
            and _trimmed(text, span)[1] > start
            and span[1] > span[0]
        ]
        if not tokens:
            continue  # truncated away
        first, last = offsets[tokens[0]], offsets[tokens[-1]]
        assert first is not None and last is not None
        covered = text[_trimmed(text, first)[0] : last[1]]
        if covered.strip() != text[start:end]:
            raise UserError(
                f"'{word}' shares a token with its neighbours in {covered.strip()!r}, so its "
                "tokens cannot be moved on their own"
            )
        spans.append((tokens[0], tokens[-1] + 1))
    return spans


def is_whole_word(text: str, offsets: Offsets, start: int, end: int) -> bool:
    """Whether tokens ``[start, end)`` cover exactly one or more whole words of ``text``.

    That is, no word character right before or right after them.
    """
    first, last = offsets[start], offsets[end - 1]
    if first is None or last is None:
        return False
    begin, finish = _trimmed(text, first)[0], last[1]
    before = begin > 0 and (text[begin - 1].isalnum() or text[begin - 1] == "_")
    after = finish < len(text) and (text[finish].isalnum() or text[finish] == "_")
    return not (before or after)
