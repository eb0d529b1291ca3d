"""Texts to padded, masked batches in input order (right padding, pads never measured)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from residual_trace._typing import AttentionMask, TokenIds
from residual_trace.errors import UserError
from residual_trace.models import TracedModel

#: The identifying columns every per-token, per-layer table starts with, in order.
TOKEN_KEYS = (
    "model",
    "text_id",
    "position",
    "layer",
    "token",
    "token_id",
    "is_special",
    "is_unk",
)

#: The same for per-token, per-block tables (what block ``block`` did to the token).
BLOCK_TOKEN_KEYS = (
    "model",
    "text_id",
    "position",
    "block",
    "token",
    "token_id",
    "is_special",
    "is_unk",
)


@dataclass(frozen=True)
class EncodedText:
    """One text's token ids (special tokens included), whether it was truncated, and the text.

    The text is kept for finding words in it; it is empty where the ids were built, not
    encoded.
    """

    text_id: int
    ids: tuple[int, ...]
    truncated: bool
    text: str = ""


@dataclass(frozen=True)
class Batch:
    """A right-padded batch: ``mask`` is 1 on real tokens, 0 on padding."""

    texts: tuple[EncodedText, ...]
    ids: TokenIds
    mask: AttentionMask


def encode_texts(model: TracedModel, texts: Sequence[str], max_length: int) -> list[EncodedText]:
    """Tokenise every text; texts over ``max_length`` tokens keep their first tokens.

    Special tokens survive truncation: [CLS] ... [SEP] stays well formed and a decoder keeps
    its BOS. Raises :class:`UserError` for an empty text.
    """
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    encoded = []
    for index, text in enumerate(texts):
        if not text.strip():
            raise UserError(f"text {index} is empty (every text needs at least one word)")
        ids = model.encode(text)
        if all(i in model.special_ids for i in ids):
            raise UserError(
                f"text {index} has no token the model can read ({_shown(text)}: only "
                "characters its tokenizer drops)"
            )
        truncated = len(ids) > max_length
        if truncated:
            ids = model.encode(text, max_length=max_length)
            framing = sum(i in model.special_ids for i in ids)
            if framing == len(ids):
                raise UserError(
                    f"--max-length {max_length} leaves text {index} nothing but its special "
                    f"tokens: give at least {framing + 1}"
                )
        encoded.append(EncodedText(text_id=index, ids=tuple(ids), truncated=truncated, text=text))
    return encoded


def _shown(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _ids_list(text_ids: Sequence[int]) -> str:
    return ", ".join(map(str, text_ids[:5])) + (" ..." if len(text_ids) > 5 else "")


def _report_unknown(
    model: TracedModel, encoded: Sequence[EncodedText], warn: Callable[[str], None]
) -> None:
    """One warning counting [UNK] tokens, and one naming the texts with nothing but [UNK].

    The [UNK] tokens are flagged ``is_unk`` in every table; in a text of nothing but [UNK],
    no token traces back to what was written.
    """
    if model.unk_id is None:
        return
    counts = [sum(model.is_unk(item.ids)) for item in encoded]
    total = sum(counts)
    if not total:
        return
    texts = [item.text_id for item, n in zip(encoded, counts, strict=True) if n]
    warn(
        f"{total} [UNK] token(s) in {len(texts)} text(s) (text ids {_ids_list(texts)}): the "
        "tokenizer has no piece for them; they are measured like other tokens and flagged "
        "is_unk"
    )
    only = [
        item.text_id
        for item, n in zip(encoded, counts, strict=True)
        if n and n == sum(i not in model.special_ids for i in item.ids)
    ]
    if only:
        warn(
            f"{len(only)} text(s) hold no token but [UNK] (text ids {_ids_list(only)}): "
            "nothing in them can be traced to its input"
        )


def _report_typed_specials(
    model: TracedModel, encoded: Sequence[EncodedText], warn: Callable[[str], None]
) -> None:
    """One warning naming the special-token strings typed inside texts.

    These are strings such as ``[SEP]``, ``[MASK]`` or ``<s>`` that the tokenizer turned into
    its special tokens: what is measured there is the special token, not the characters typed.
    """
    tokenizer = model.tokenizer
    strings = {
        str(token): tokenizer.convert_tokens_to_ids(str(token))
        for token in getattr(tokenizer, "all_special_tokens", ())
        if token and len(str(token)) > 1
    }
    strings = {k: v for k, v in strings.items() if isinstance(v, int) and v in model.special_ids}
    if not strings:
        return
    structural = Counter(model.encode("a"))
    found: dict[str, list[int]] = {}
    for item in encoded:
        if not item.text:
            continue
        counts = Counter(item.ids)
        for string, token_id in strings.items():
            if string in item.text and counts[token_id] > structural[token_id]:
                found.setdefault(string, []).append(item.text_id)
    if found:
        texts = sorted({i for ids in found.values() for i in ids})
        named = ", ".join(repr(s) for s in sorted(found))
        warn(
            f"{len(texts)} text(s) (text ids {_ids_list(texts)}) contain {named}, which the "
            "tokenizer reads as its special token(s), not as the characters typed: those "
            "positions are special tokens in every table"
        )


def prepare_texts(
    model: TracedModel,
    texts: Sequence[str],
    max_length: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[EncodedText]:
    """:func:`encode_texts` with the length limit resolved and truncation reported.

    ``max_length`` defaults to the model's position limit, capped at 512; a larger value than
    the model's limit is an error. ``warn`` receives one line naming the truncated texts.
    """
    limit = max_length or min(model.max_positions, 512)
    if limit > model.max_positions:
        raise UserError(f"--max-length {limit} exceeds the model's {model.max_positions} positions")
    encoded = encode_texts(model, texts, limit)
    if warn is not None:
        _report_unknown(model, encoded, warn)
        _report_typed_specials(model, encoded, warn)
    truncated = [e.text_id for e in encoded if e.truncated]
    if truncated and warn is not None:
        shown = ", ".join(map(str, truncated[:5])) + (" ..." if len(truncated) > 5 else "")
        warn(
            f"{len(truncated)} text(s) longer than --max-length {limit} tokens were "
            f"truncated to their first {limit} tokens (text ids {shown})"
        )
    return encoded


def iter_batches(encoded: Sequence[EncodedText], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Consecutive groups of ``batch_size`` texts, right-padded with ``pad_id``."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    for start in range(0, len(encoded), batch_size):
        group = tuple(encoded[start : start + batch_size])
        width = max(len(e.ids) for e in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, item in enumerate(group):
            ids[row, : len(item.ids)] = torch.tensor(item.ids, dtype=torch.long)
            mask[row, : len(item.ids)] = 1
        yield Batch(texts=group, ids=ids, mask=mask)
