"""Token strings as a reader expects them: tokenizer markers removed, bytes decoded."""

from __future__ import annotations

from functools import cache

__all__ = ["clean_token"]


@cache
def _byte_of() -> dict[str, int]:
    """Byte-level BPE's printable stand-in of every byte (GPT-2's table), inverted."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(kept)
    shift = 0
    for byte in range(256):
        if byte not in kept:
            kept.append(byte)
            chars.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(kept, chars, strict=True)}


def _decoded(token: str) -> str | None:
    """``token`` read as byte-level BPE (``Ġ`` a space, ``Ã©`` an é), or ``None`` if it is not."""
    table = _byte_of()
    if not any(ord(ch) >= 256 for ch in token) or not all(ch in table for ch in token):
        return None
    try:
        return bytes(table[ch] for ch in token).decode("utf-8")
    except UnicodeDecodeError:
        return None


def clean_token(token: str) -> str:
    r"""A tokenizer's token string as text: markers of spaces and word pieces removed.

    Byte-level BPE (``Ġ`` a space, ``Ċ`` a newline, other bytes of a UTF-8 character
    decoded), SentencePiece's ``▁`` and WordPiece's ``##`` continuation prefix; an empty
    result is shown as ``␣``.

    Examples:
        >>> clean_token("Ġthe"), clean_token("##ing"), clean_token("▁Paris"), clean_token("Ċ")
        ('the', 'ing', 'Paris', '\\n')
        >>> clean_token("ĠcafÃ©"), clean_token("é")
        ('café', 'é')
    """
    decoded = _decoded(token)
    text = decoded if decoded is not None else token.replace("Ġ", " ").replace("▁", " ")
    text = text.replace("Ċ", "\n").replace("\n", "\\n")
    text = text.removeprefix("##").strip()
    return text or "␣"
