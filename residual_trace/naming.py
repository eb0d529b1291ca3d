"""How residual-trace numbers layers, blocks and heads (TransformerLens's convention).

``layer`` counts residual states:
layer 0 is the input of block 0 (``blocks.0.hook_resid_pre``) and layer k (1..L) is the
output of block k-1 (``blocks.{k-1}.hook_resid_post``). ``block`` (0..L-1) and ``head``
(0..H-1) count components, and a head is named ``L{block}H{head}`` (``L2H7``). Tables of
residual states carry ``layer``; tables of what a block or head does carry ``block``.
"""

from __future__ import annotations

import re

from residual_trace.errors import UserError

__all__ = ["NAMING", "head_name", "parse_head_name"]

#: The convention in one line (for figure captions and ``--help``).
NAMING = "layer k = output of block k-1 (layer 0 = input of block 0); heads L{block}H{head}"


def head_name(block: int, head: int) -> str:
    """``L{block}H{head}``, TransformerLens's name of a head.

    For ``head == -1``, the attention output bias, the name is ``L{block}b_O``.

    Examples:
        >>> head_name(2, 7), head_name(0, -1)
        ('L2H7', 'L0b_O')
    """
    return f"L{block}b_O" if head < 0 else f"L{block}H{head}"


def parse_head_name(
    text: str, n_blocks: int | None = None, n_heads: int | None = None
) -> tuple[int, int]:
    """``"L2H7"`` -> ``(2, 7)``; a clear error for anything else or out of range.

    Examples:
        >>> parse_head_name("L0H2")
        (0, 2)
    """
    match = re.fullmatch(r"[Ll](\d+)[Hh](\d+)", text.strip())
    if match is None:
        raise UserError(
            f"head {text!r}: expected L<block>H<head> (TransformerLens naming, both from 0), "
            "e.g. L0H2"
        )
    block, head = int(match.group(1)), int(match.group(2))
    ranges = []
    if n_blocks is not None:
        ranges.append(f"blocks 0..{n_blocks - 1}")
    if n_heads is not None:
        ranges.append(f"heads 0..{n_heads - 1}")
    if (n_blocks is not None and block >= n_blocks) or (n_heads is not None and head >= n_heads):
        raise UserError(f"head {text}: the model has {' and '.join(ranges)}")
    return block, head
