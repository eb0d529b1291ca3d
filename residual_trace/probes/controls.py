"""The conditions a probe score is read against.

Each is what the same mapper reaches when the embeddings cannot carry the norms' meaning.

==================  ===========================================================================
``system``          the embeddings -> the norms
``upper``           the norms -> themselves, through the same mapper (the ceiling)
``shuffled``        the concept-to-vector assignment permuted, -> the norms
``shuffled-upper``  the norms of permuted concepts -> the norms
``random``          the embeddings -> random features with the norms' shape, per-feature
                    sparsity and moments (mean and spread of the non-zero values)
``taxonomic``       vectors exchanged among concepts of the same category -> the norms (only
                    when the norms give categories)
``nonsense``        the embeddings -> structured nonsense: random features with the norms'
                    singular values (so the same rank and spectrum) and sparsity
``random-init``     embeddings of the same architecture with seeded random weights -> the norms
==================  ===========================================================================

Each condition is a pair (inputs, targets) over the same concepts; the metrics are computed
against the condition's own targets. A score that ``shuffled`` or ``nonsense`` reaches too is
about the geometry of the data, not about what the embeddings encode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from residual_trace.probes import CONDITIONS

__all__ = [
    "CONDITIONS",
    "condition_data",
    "fill_missing",
    "random_features",
    "structured_nonsense",
    "within_category_permutation",
]


def fill_missing(values: np.ndarray) -> np.ndarray:
    """Missing ratings (NaN) replaced by their feature's mean, for use as *inputs* only."""
    means = np.nanmean(np.where(np.isnan(values).all(axis=0), 0.0, values), axis=0)
    return np.where(np.isnan(values), means, values)


def random_features(norms: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random targets with the norms' shape and, per feature, the norms' sparsity and moments.

    Per feature: the same share of zeros, and the same mean and standard deviation of the
    non-zero values (clipped to their range).

    Examples:
        >>> y = np.array([[0.0, 2.0], [1.0, 0.0], [3.0, 4.0], [0.0, 6.0]])
        >>> r = random_features(y, np.random.default_rng(0))
        >>> r.shape, (r == 0).sum(axis=0).tolist()
        ((4, 2), [2, 1])
    """
    values = fill_missing(norms)
    out = np.zeros_like(values)
    n = len(values)
    for j in range(values.shape[1]):
        column = values[:, j]
        nonzero = column[column != 0]
        if nonzero.size == 0:
            continue
        rows = rng.choice(n, size=nonzero.size, replace=False)
        draws = rng.normal(nonzero.mean(), nonzero.std(), size=nonzero.size)
        draws = np.clip(draws, nonzero.min(), nonzero.max())
        draws[draws == 0] = nonzero.mean()
        out[rows, j] = draws
    return out


def structured_nonsense(norms: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random features with the norms' singular values (the same rank and spectrum).

    For feature listings they also keep the same share of zeros per feature.

    A random rotation of the left and right singular vectors keeps every singular value and
    destroys which concept has which feature; the columns are then moved back to the norms'
    means, and the smallest entries of each column zeroed to restore its sparsity.
    """
    values = fill_missing(norms)
    means = values.mean(axis=0)
    centred = values - means
    _, singular, _ = np.linalg.svd(centred, full_matrices=False)
    n, f = values.shape
    rank = len(singular)
    left, _ = np.linalg.qr(rng.normal(size=(n, rank)))
    right, _ = np.linalg.qr(rng.normal(size=(f, rank)))
    out = (left * singular) @ right.T + means
    zeros = (values == 0).mean(axis=0)
    for j in range(f):
        if zeros[j] > 0:
            cut = np.quantile(out[:, j], zeros[j])
            out[out[:, j] <= cut, j] = 0.0
    return out


def within_category_permutation(
    categories: Sequence[str | None], rng: np.random.Generator
) -> np.ndarray:
    """A permutation that exchanges concepts only with others of the same category.

    Concepts without a category, or alone in theirs, stay.
    """
    order = np.arange(len(categories))
    groups: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        if category is not None:
            groups.setdefault(category, []).append(i)
    for members in groups.values():
        if len(members) > 1:
            order[members] = rng.permutation(members)
    return order


def condition_data(
    condition: str,
    embeddings: np.ndarray,
    norms: np.ndarray,
    rng: np.random.Generator,
    categories: Sequence[str | None] | None = None,
    random_init: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(inputs, targets) of one condition, or ``None`` where it does not apply.

    It does not apply without categories for ``taxonomic``, or without random-initialised
    embeddings for ``random-init``.
    """
    n = len(norms)
    if condition == "system":
        return embeddings, norms
    if condition == "upper":
        return fill_missing(norms), norms
    if condition == "shuffled":
        return embeddings[rng.permutation(n)], norms
    if condition == "shuffled-upper":
        return fill_missing(norms)[rng.permutation(n)], norms
    if condition == "random":
        return embeddings, random_features(norms, rng)
    if condition == "nonsense":
        return embeddings, structured_nonsense(norms, rng)
    if condition == "taxonomic":
        if categories is None or not any(c is not None for c in categories):
            return None
        return embeddings[within_category_permutation(categories, rng)], norms
    if condition == "random-init":
        return None if random_init is None else (random_init, norms)
    raise ValueError(f"unknown condition {condition}")
