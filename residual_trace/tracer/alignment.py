"""Does an attention head follow tokens or positions? Compare patterns under two alignments.

A perturbation moves tokens by a permutation pi of positions: the token at position i in the
original text sits at position pi(i) in the perturbed one. With A the original pattern and A'
the perturbed one (rows: queries, columns: keys, each row a distribution):

- *token alignment*: row i of A against row pi(i) of A' with columns re-indexed by pi,
  A'[pi(i), pi(j)]: what a head that follows tokens would reproduce;
- *position alignment*: row i of A against row i of A', A'[i, j]: what a head that follows
  positions would reproduce.

Only *informative* rows are compared: rows whose two views of the perturbed pattern,
A'[pi(i), pi(.)] and A'[i, .], differ (Jensen-Shannon distance at least
:data:`MIN_VIEW_DISTANCE`). These are the rows the permutation moves and the unmoved rows that
attend to moved keys. Where the two views coincide (a previous-token head on a row whose
neighbour moved along with it, or a row attending only to unmoved keys) the row supports both
hypotheses equally and would only dilute the index; the criterion is symmetric, so it favours
neither. For causal models a key is
kept only where both alignments allow it (j <= i and pi(j) <= pi(i)); rows are renormalised
over the kept keys, and rows with fewer than two kept keys, or whose kept keys hold less than
:data:`MIN_KEPT_MASS` of the attention, are skipped.

The similarity of two rows is 1 minus their Jensen-Shannon distance d (base 2, so in [0, 1]):
it is symmetric, bounded, defined when a row has zeros (unlike KL), and a true metric, which
the index relies on. Per informative row the index is

    r_i = (d(A_i, position view) - d(A_i, token view)) / d(token view, position view),

which the triangle inequality keeps in [-1, 1]: +1 when the original row coincides with the
token view (the head moved with the tokens), -1 when it coincides with the position view,
0 when it is equally far from both. Dividing by the distance between the views makes a row
whose views differ a little count as much as one whose views differ completely, so the index
says *which* hypothesis a head follows, not how much the perturbation happened to move its
mass. The head's index is the mean of r_i over its informative rows; ``sim_token`` and
``sim_position`` (mean 1 - d to each view) are reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from residual_trace._typing import Bool, Float, Int, Tensor

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
        follow_index: mean over informative rows of the normalised index r_i ``[head]``, in
            [-1, 1]; NaN when no row is informative.
        n_rows: informative rows compared, per head ``[head]``.
    """

    sim_token: Float[Tensor, " head_index"]
    sim_position: Float[Tensor, " head_index"]
    follow_index: Float[Tensor, " head_index"]
    n_rows: Int[Tensor, " head_index"]


def _allowed(permutation: Int[Tensor, " n"], causal: bool) -> Bool[Tensor, "n n"]:
    """Which (target, source) pairs both readings can attend to.

    All of them, or for a causal model the pairs whose source precedes the target in both
    orders.
    """
    n = permutation.shape[0]
    if not causal:
        return torch.ones(n, n, dtype=torch.bool, device=permutation.device)
    positions = torch.arange(n, device=permutation.device)
    return (positions[None, :] <= positions[:, None]) & (
        permutation[None, :] <= permutation[:, None]
    )


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
        >>> float(align_patterns(previous, previous, swap, causal=False).follow_index[0])
        -1.0
        >>> eye = torch.eye(4)[None]   # attending to itself looks the same either way:
        >>> align_patterns(eye, eye, swap, causal=False).follow_index.isnan().item()  # no evidence
        True
    """
    # token alignment: perturbed[h, pi(i), pi(j)] for every (i, j)
    token_view = perturbed[:, permutation][:, :, permutation]
    allowed = _allowed(permutation, causal)
    candidates = allowed.sum(-1) >= 2
    heads = original.shape[0]
    nan = torch.full((heads,), float("nan"), device=original.device)
    if not bool(candidates.any()):
        none = torch.zeros(heads, dtype=torch.long)
        return Alignment(sim_token=nan, sim_position=nan, follow_index=nan, n_rows=none)
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
    to_token = 1.0 - js_similarity(reference, token_rows)
    to_position = 1.0 - js_similarity(reference, position_rows)
    between = (1.0 - js_similarity(token_rows, position_rows)).clamp_min(MIN_VIEW_DISTANCE)
    per_row = ((to_position - to_token) / between).clamp(-1.0, 1.0)  # rounding only

    def mean(values: Tensor) -> Tensor:
        return torch.where(counts > 0, (values * weights).sum(-1), nan)

    return Alignment(
        sim_token=mean(1.0 - to_token),
        sim_position=mean(1.0 - to_position),
        follow_index=mean(per_row),
        n_rows=counts.cpu(),
    )


def rerun_distance(
    original: Float[Tensor, "head_index n n"], rerun: Float[Tensor, "head_index n n"]
) -> Float[Tensor, " head_index"]:
    """Mean over rows of the Jensen-Shannon distance between two runs of the same text.

    It is 0 when the forward pass is bit-for-bit reproducible.

    Examples:
        >>> a = torch.softmax(torch.randn(2, 5, 5), -1)
        >>> rerun_distance(a, a).tolist()
        [0.0, 0.0]
    """
    return 1.0 - js_similarity(original, rerun).mean(-1)


def position_similarity(
    original: Float[Tensor, "head_index n n"],
    perturbed: Float[Tensor, "head_index n n"],
    rows: Bool[Tensor, " n"],
) -> Float[Tensor, " head_index"]:
    """Mean similarity (1 - JS distance) of the two patterns at the same positions.

    It is taken over the chosen query ``rows``: how much of a head's pattern survives when
    the tokens change (random tokens, shuffled embeddings) while the positions stay. NaN
    without rows.
    """
    if not bool(rows.any()):
        return torch.full((original.shape[0],), float("nan"))
    return js_similarity(original[:, rows], perturbed[:, rows]).mean(-1)


@dataclass(frozen=True)
class ResidAlignment:
    """Per residual layer: mean cosine of the perturbed states to the original ones.

    Attributes:
        cos_token: mean over compared positions i of cos(h'[pi(i)], h[i]): the state now
            holding the same token ``[layer]``.
        cos_position: mean of cos(h'[i], h[i]): the state at the same position ``[layer]``.
        n_positions: positions compared.
    """

    cos_token: Float[Tensor, " layer"]
    cos_position: Float[Tensor, " layer"]
    n_positions: int


def resid_alignment(
    original: Float[Tensor, "layer n d_model"],
    perturbed: Float[Tensor, "layer n d_model"],
    permutation: Int[Tensor, " n"],
    positions: Bool[Tensor, " n"],
) -> ResidAlignment:
    """The residual stream's version of the token-vs-position test, over ``positions``.

    Examples:
        >>> h = torch.eye(3)[None]                  # three orthogonal states, one layer
        >>> swap = torch.tensor([0, 2, 1])
        >>> moved = h[:, [0, 2, 1]]                 # the states moved with their tokens
        >>> r = resid_alignment(h, moved, swap, swap != torch.arange(3))
        >>> r.cos_token.tolist(), r.cos_position.tolist()
        ([1.0], [0.0])
    """
    if not bool(positions.any()):
        nan = torch.full((original.shape[0],), float("nan"))
        return ResidAlignment(cos_token=nan, cos_position=nan, n_positions=0)
    reference = original[:, positions]
    token = perturbed[:, permutation[positions]]
    same = perturbed[:, positions]
    cos_token = torch.nn.functional.cosine_similarity(token, reference, dim=-1).mean(-1)
    cos_position = torch.nn.functional.cosine_similarity(same, reference, dim=-1).mean(-1)
    return ResidAlignment(
        cos_token=cos_token, cos_position=cos_position, n_positions=int(positions.sum())
    )
