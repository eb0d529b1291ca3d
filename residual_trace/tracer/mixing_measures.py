"""The context-mixing measures of ``trace decompose``, declared once.

Each measure is declared with its column, labels, definition and reference.

:data:`MIXING` is read by the mixing table's and summary's column lists
(:mod:`residual_trace.tracer.mixing`, :mod:`residual_trace.tracer.decompose_summary`), the
console summary of ``trace decompose``, its ``mixing.png``, the report's mixing panels and
the documentation (:func:`markdown_table`). Each measure is the share of a token's
attention-block output (or, rolled out, of its state) that comes from *other* tokens, in
[0, 1]. This module imports nothing heavy.

Examples:
    >>> [m.column for m in MIXING][:3]
    ['mix_raw', 'mix_attn_n', 'mix_attnres_n']
    >>> measure("mix_alti").reference
    'Ferrando et al. 2022'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DISPLAYED", "MIXING", "MixingMeasure", "markdown_table", "measure"]


@dataclass(frozen=True)
class MixingMeasure:
    """One context-mixing measure.

    Attributes:
        column: its column in ``mixing.csv`` and ``summary.csv`` (with ``_lo``/``_hi``).
        short: its name in the console summary (``Attn-W``).
        legend: its name in the legend of ``mixing.png``.
        definition: what the number is, in one sentence.
        reference: who defined it (the code it is checked against).
        rolled_out: whether it compounds over the blocks so far (else: this block alone).
        defined_for: the models it is defined for (``all``, or a note).
    """

    column: str
    short: str
    legend: str
    definition: str
    reference: str
    rolled_out: bool = False
    defined_for: str = "all"

    @property
    def width(self) -> int:
        """Its column width in the console summary."""
        return max(len(self.short), 5)


#: Every mixing measure, in the column order of ``mixing.csv`` and ``summary.csv``.
MIXING: tuple[MixingMeasure, ...] = (
    MixingMeasure(
        "mix_raw",
        "Attn-W",
        "raw attention on other tokens",
        "1 - the attention weight a token puts on itself, averaged over heads (the naive "
        "reading of attention maps)",
        "Kobayashi et al. 2020 (its attention-weight baseline)",
    ),
    MixingMeasure(
        "mix_attn_n",
        "Attn-N",
        "Attn-N (Kobayashi 2020)",
        "|c_i| / (|c_i| + |a_ii|): the norm of the weighted value vectors from other tokens "
        "against the token's own term",
        "Kobayashi et al. 2020",
    ),
    MixingMeasure(
        "mix_attnres_n",
        "AttnRes-N",
        "AttnRes-N (Kobayashi 2021)",
        "Attn-N with the residual x_i added to the token's own term",
        "Kobayashi et al. 2021",
    ),
    MixingMeasure(
        "mix_attnresln_n",
        "AttnResLn-N",
        "AttnResLn-N (Kobayashi 2021)",
        "AttnRes-N with both terms carried through the norm after the sum (its real "
        "divisor at the token)",
        "Kobayashi et al. 2021",
        defined_for="blocks with a norm after the attention sum (post-LN, Gemma 2/3, OLMo 2)",
    ),
    MixingMeasure(
        "mix_rollout",
        "rollout",
        "attention rollout (Abnar & Zuidema)",
        "1 - the diagonal of the product of the blocks' 0.5 * (A + I), heads averaged",
        "Abnar and Zuidema 2020",
        rolled_out=True,
    ),
    MixingMeasure(
        "mix_globenc",
        "GlobEnc",
        "GlobEnc, rolled out (Modarressi 2022)",
        "1 - G_ii / sum_j G_ij, G the product of the layers' norms of each term carried "
        "through both norms of the layer",
        "Modarressi et al. 2022",
        rolled_out=True,
    ),
    MixingMeasure(
        "mix_alti",
        "ALTI",
        "ALTI, rolled out (Ferrando 2022)",
        "1 - R_ii, R the product of the layers' ALTI contributions "
        "max(0, |y_i|_1 - |y_i - T_i(x_j)|_1), rows normalised",
        "Ferrando et al. 2022",
        rolled_out=True,
    ),
    MixingMeasure(
        "mix_vz",
        "VZ",
        "Value Zeroing (Mohebbi 2023)",
        "1 - S_ii, S_it the cosine distance of the block's output at i when token t's value "
        "vectors are zeroed, rows normalised",
        "Mohebbi et al. 2023",
        defined_for="texts of at most --vz-max-tokens tokens",
    ),
    MixingMeasure(
        "mix_vz_rollout",
        "VZ roll",
        "Value Zeroing, rolled out",
        "1 - R_ii, R the product of the blocks' Value Zeroing matrices",
        "Mohebbi et al. 2023",
        rolled_out=True,
        defined_for="texts of at most --vz-max-tokens tokens",
    ),
)

#: The order the console summary and ``mixing.png`` show them in (rollout beside raw
#: attention, the attention-only reading it corrects).
DISPLAYED: tuple[MixingMeasure, ...] = tuple(
    sorted(MIXING, key=lambda m: 0.5 if m.column == "mix_rollout" else MIXING.index(m))
)


def measure(column: str) -> MixingMeasure:
    """The measure of ``column`` (``KeyError`` if there is none)."""
    for candidate in MIXING:
        if candidate.column == column:
            return candidate
    raise KeyError(column)


def markdown_table() -> str:
    """The measures as a Markdown table (column, name, definition, reference, scope)."""
    lines = [
        "| column | name | what it is | reference | rolled out | defined for |",
        "|---|---|---|---|---|---|",
    ]
    for m in MIXING:
        rolled = "yes" if m.rolled_out else "no"
        lines.append(
            f"| `{m.column}` | {m.short} | {m.definition} | {m.reference} | {rolled} | "
            f"{m.defined_for} |"
        )
    return "\n".join(lines)
