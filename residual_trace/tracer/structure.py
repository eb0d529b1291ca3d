"""How "structured" an attention pattern looks, in numbers, per head.

These are the measures behind the visualisation fallacy: a head can look meaningful
(sharp, diagonal, previous-token, [SEP]-heavy) while carrying no information about the
tokens. Comparing them on the original model and on a model whose token embeddings were
shuffled (:func:`residual_trace.experiments.perturbations.shuffled_embeddings`) shows how
much of the look survives without token identity.

All measures are means over the chosen query rows (by default the non-special tokens):

- ``entropy``: Shannon entropy of the row in bits (0 = all attention on one key;
  log2(n) = uniform);
- ``diag_mass``: attention on the query's own position;
- ``prev_mass`` / ``next_mass``: attention on the previous / next position (Clark et al.
  2019 call a head positional when either exceeds 0.5); ``next_mass`` is NaN for causal
  models, which cannot attend ahead;
- ``special_mass``: attention on special tokens ([CLS], [SEP], BOS).
"""

from __future__ import annotations

import torch

from residual_trace._typing import Bool, Float, Tensor

#: The structure columns, in table order.
STRUCTURE_COLUMNS = ("entropy", "diag_mass", "prev_mass", "next_mass", "special_mass")


def pattern_structure(
    patterns: Float[Tensor, "head_index n n"],
    special: Bool[Tensor, " n"],
    rows: Bool[Tensor, " n"],
    causal: bool,
) -> dict[str, Float[Tensor, " head_index"]]:
    """The :data:`STRUCTURE_COLUMNS` of one layer's patterns, averaged over ``rows``.

    Examples:
        >>> previous = torch.eye(4)[[0, 0, 1, 2]][None]
        >>> rows = torch.tensor([False, True, True, True])
        >>> special = torch.tensor([True, False, False, False])
        >>> s = pattern_structure(previous, special, rows, causal=True)
        >>> [round(float(s[k][0]), 3) for k in ("entropy", "prev_mass", "special_mass")]
        [0.0, 1.0, 0.333]
    """
    heads, n, _ = patterns.shape
    nan = torch.full((heads,), float("nan"), dtype=patterns.dtype, device=patterns.device)
    if not bool(rows.any()):
        return {name: nan for name in STRUCTURE_COLUMNS}
    logs = torch.where(patterns > 0, torch.log2(patterns.clamp_min(1e-30)), 0.0)
    entropy = -(patterns * logs).sum(-1)
    diagonal = patterns.diagonal(dim1=-2, dim2=-1)
    previous = torch.zeros(heads, n, dtype=patterns.dtype, device=patterns.device)
    previous[:, 1:] = patterns.diagonal(offset=-1, dim1=-2, dim2=-1)
    following = torch.zeros(heads, n, dtype=patterns.dtype, device=patterns.device)
    following[:, :-1] = patterns.diagonal(offset=1, dim1=-2, dim2=-1)
    special_mass = patterns[..., special].sum(-1)
    has_previous = rows.clone()
    has_previous[0] = False
    has_next = rows.clone()
    has_next[-1] = False

    def mean(values: Tensor, over: Tensor) -> Tensor:
        return values[:, over].mean(-1) if bool(over.any()) else nan

    return {
        "entropy": mean(entropy, rows),
        "diag_mass": mean(diagonal, rows),
        "prev_mass": mean(previous, has_previous),
        "next_mass": nan if causal else mean(following, has_next),
        "special_mass": mean(special_mass, rows),
    }
