"""Console text that fits a terminal: wide tables split into column groups, prose wrapped.

The summaries ``trace`` prints are fixed-width tables and sentences. :func:`fit_width` keeps
every line within ``width`` columns: a table wider than that is cut at its column gaps
(runs of two or more spaces down every row) into several tables, each repeating the first
column; a longer sentence is wrapped. ``--wide`` prints the text as it is.
"""

from __future__ import annotations

import itertools
import re
import textwrap

#: Columns the console summaries fit in, unless ``--wide``.
CONSOLE_WIDTH = 100

_GAP = re.compile(r" {2,}")


def _is_table_row(line: str) -> bool:
    return len(_GAP.findall(line.strip())) >= 2


def fit_width(text: str, width: int = CONSOLE_WIDTH) -> str:
    r"""``text`` with every line within ``width`` columns (see the module docstring).

    Examples:
        >>> table = "block  alpha  beta\n    0   0.10  0.20\n    1   0.30  0.40"
        >>> print(fit_width(table, width=13))
        block  alpha
            0   0.10
            1   0.30
        <BLANKLINE>
        block  beta
            0  0.20
            1  0.40
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        j = i
        while j < len(lines) and _is_table_row(lines[j]):
            j += 1
        if j - i >= 2:
            out += _split_table(lines[i:j], width)
            i = j
            continue
        line = lines[i]
        if len(line) > width:
            indent = " " * (len(line) - len(line.lstrip()))
            out += textwrap.wrap(
                line, width, subsequent_indent=indent + "  ", break_on_hyphens=False
            )
        else:
            out.append(line)
        i += 1
    return "\n".join(out)


def _columns(rows: list[str]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each column, its leading gap included.

    A gap is a run of two or more positions blank in every row; the table is cut where each
    gap starts, so that each column keeps the spaces before it.
    """
    length = max(len(r) for r in rows)
    padded = [r.ljust(length) for r in rows]
    blank = [all(r[k] == " " for r in padded) for k in range(length)]
    cuts, k = [0], 0
    while k < length:
        if blank[k]:
            start = k
            while k < length and blank[k]:
                k += 1
            if k - start >= 2 and start > 0 and k < length:
                cuts.append(start)
        else:
            k += 1
    cuts.append(length)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _split_table(rows: list[str], width: int) -> list[str]:
    """``rows`` as is when they fit, else as several tables each led by the first column."""
    if max(len(r) for r in rows) <= width:
        return rows
    spans = _columns(rows)
    if len(spans) < 3:
        return rows
    key = spans[0]
    groups: list[list[tuple[int, int]]] = [[]]
    used = key[1] - key[0]
    for span in spans[1:]:
        size = span[1] - span[0]
        if groups[-1] and used + size > width:
            groups.append([])
            used = key[1] - key[0]
        groups[-1].append(span)
        used += size
    out: list[str] = []
    for n, group in enumerate(groups):
        if n:
            out.append("")
        for row in rows:
            padded = row.ljust(spans[-1][1])
            line = padded[key[0] : key[1]] + "".join(padded[a:b] for a, b in group)
            out.append(line.rstrip())
    return out


def table(headers: list[str], rows: list[list[str]], left: int = 0) -> list[str]:
    r"""Columns two spaces apart, each as wide as its widest cell.

    Right-aligned, but for the first ``left`` columns (labels), which are left-aligned.

    Examples:
        >>> print("\n".join(table(["block", "x"], [["0", "+0.25 [+0.1, +0.4]"]])))
        block                   x
            0  +0.25 [+0.1, +0.4]
    """
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(headers)]
    return [
        "  ".join(
            cell.ljust(w) if k < left else cell.rjust(w)
            for k, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in [headers, *rows]
    ]
