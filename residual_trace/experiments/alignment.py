"""Does an attention head follow tokens or positions? Compare patterns under two alignments.

A perturbation moves tokens by a permutation pi of positions: the token at position i in the
original text sits at position pi(i) in the perturbed one. With A the original pattern and A'
the perturbed one (rows: queries, columns: keys, each row a distribution):

- *token alignment*: row i of A against row pi(i) of A' with columns re-indexed by pi,
  A'[pi(i), pi(j)]: what a head that follows tokens would reproduce;
- *position alignment*: row i of A against row i of A', A'[i, j]: what a head that follows
  positions would reproduce.

Only *informative* rows are compared: rows the permutation moves (pi(i) != i) whose two views
of the perturbed pattern, A'[pi(i), pi(.)] and A'[i, .], differ (Jensen-Shannon distance at least
:data:`MIN_VIEW_DISTANCE`). Where the two views coincide (a previous-token head on a row whose
neighbour moved along with it, say) the row supports both hypotheses equally and would only
dilute the index; the criterion is symmetric, so it favours neither. For causal models a key is
kept only where both alignments allow it (j <= i and pi(j) <= pi(i)); rows are renormalised
over the kept keys, and rows with fewer than two kept keys, or whose kept keys hold less than
:data:`MIN_KEPT_MASS` of the attention, are skipped.

The similarity of two rows is 1 minus their Jensen-Shannon distance (base 2, so in [0, 1]): it
is symmetric, bounded, defined when a row has zeros (unlike KL), and a true metric's
complement, so "0.9 vs 0.6" reads the same for every head. The token-following index is
``sim_token - sim_position`` in [-1, 1]: +1 the head moved with the tokens, -1 it stayed with
the positions, 0 the two cannot be told apart (e.g. uniform attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from residual_trace._typing import Float, Int, Tensor

#: Smallest Jensen-Shannon distance between the two views of a perturbed row for that row to
#: be informative (able to tell a token-following head from a position-following one).
MIN_VIEW_DISTANCE = 0.1

#: Causal models: the keys both alignments allow must carry at least this share of a row's
#: attention (in the original and in both views); otherwise the renormalised row is a sliver
#: of tail mass and its comparison is noise.
MIN_KEPT_MASS = 0.5


def js_similarity(
    p: Float[Tensor, "*rows n"], q: Float[Tensor, "*rows n"]
) -> Float[Tensor, " *rows"]:
    """1 - Jensen-Shannon distance (base 2) between distributions along the last axis.

    Examples:
        >>> p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
        >>> js_similarity(p, p).tolist()
        [1.0, 1.0]
        >>> float(js_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])))
        0.0
    """
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        ratio = torch.where(a > 0, a / b.clamp_min(1e-30), torch.ones_like(a))
        return (a * torch.log2(ratio)).sum(-1)

    divergence = (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(0.0, 1.0)
    return 1.0 - divergence.sqrt()


@dataclass(frozen=True)
class Alignment:
    """Per head: mean similarity under each alignment and the token-following index.

    Attributes:
        sim_token: mean over compared rows of the token-aligned similarity ``[head]``.
        sim_position: the same for the position alignment ``[head]``.
        index: ``sim_token - sim_position`` ``[head]``; NaN when no row is informative.
        n_rows: informative rows compared (the most over heads; each head has its own).
    """

    sim_token: Float[Tensor, " head_index"]
    sim_position: Float[Tensor, " head_index"]
    index: Float[Tensor, " head_index"]
    n_rows: int


def align_patterns(
    original: Float[Tensor, "head_index n n"],
    perturbed: Float[Tensor, "head_index n n"],
    permutation: Int[Tensor, " n"],
    causal: bool,
) -> Alignment:
    """Compare one layer's patterns of an original and a permuted text (see module docstring).

    ``permutation[i]`` is the position in the perturbed text of the token at position i.

    Examples:
        >>> previous = torch.eye(4)[[0, 0, 1, 2]][None]   # a previous-token head
        >>> swap = torch.tensor([0, 2, 1, 3])             # tokens 1 and 2 exchanged
        >>> float(align_patterns(previous, previous, swap, causal=False).index[0])
        -1.0
        >>> eye = torch.eye(4)[None]   # attending to itself looks the same either way:
        >>> align_patterns(eye, eye, swap, causal=False).index.isnan().item()  # no evidence
        True
    """
    n = permutation.shape[0]
    positions = torch.arange(n, device=permutation.device)
    moved = permutation != positions
    # token alignment: perturbed[h, pi(i), pi(j)] for every (i, j)
    token_view = perturbed[:, permutation][:, :, permutation]
    allowed = torch.ones(n, n, dtype=torch.bool, device=permutation.device)
    if causal:
        allowed = (positions[None, :] <= positions[:, None]) & (
            permutation[None, :] <= permutation[:, None]
        )
    candidates = moved & (allowed.sum(-1) >= 2)
    heads = original.shape[0]
    nan = torch.full((heads,), float("nan"))
    if not bool(candidates.any()):
        return Alignment(sim_token=nan, sim_position=nan, index=nan, n_rows=0)
    keep = allowed[candidates].to(original.dtype)  # [rows, n]

    def renormalise(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x[:, candidates] * keep
        mass = x.sum(-1)
        return x / mass[..., None].clamp_min(1e-30), mass

    reference, mass_ref = renormalise(original)
    token_rows, mass_token = renormalise(token_view)
    position_rows, mass_position = renormalise(perturbed)
    enough = torch.stack([mass_ref, mass_token, mass_position]).min(0).values >= MIN_KEPT_MASS
    informative = enough & ((1.0 - js_similarity(token_rows, position_rows)) >= MIN_VIEW_DISTANCE)
    counts = informative.sum(-1)  # per head
    weights = informative.to(original.dtype) / counts.clamp_min(1)[:, None]
    sim_token = (js_similarity(reference, token_rows) * weights).sum(-1)
    sim_position = (js_similarity(reference, position_rows) * weights).sum(-1)
    sim_token = torch.where(counts > 0, sim_token, nan)
    sim_position = torch.where(counts > 0, sim_position, nan)
    return Alignment(
        sim_token=sim_token,
        sim_position=sim_position,
        index=sim_token - sim_position,
        n_rows=int(counts.max()),
    )
