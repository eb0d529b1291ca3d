"""Probe metrics, exactly as defined in the project's MISSION.

Each is computed per test concept c with gold vector g_c and prediction p_c, and averaged
over concepts.

- F1@k (sparse, feature-listing norms): the k features with the highest *predicted* value
  against the gold set G_c = {features with value > 0}; P = |top-k ∩ G_c| / k,
  R = |top-k ∩ G_c| / |G_c|. Gold features are never binarised beyond "> 0" and never sorted
  ascending (two traps of a public reference implementation).
- Spearman rho per concept, across features (and, as an option, per feature across
  concepts).
- Neighbourhood Accuracy@k: rank the gold vectors of all candidate concepts by cosine to p_c;
  a hit when g_c is among the k nearest.

Each function returns one value per concept (or feature), NaN where it is undefined (no gold
features, a constant vector), so callers can average with ``np.nanmean`` and count.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def f1_at_k(predicted: np.ndarray, gold: np.ndarray, k: int = 10) -> np.ndarray:
    """F1 of each concept's top-``k`` predicted features against its gold features.

    Examples:
        >>> gold = np.zeros((1, 20)); gold[0, :13] = 1.0     # 13 gold features
        >>> round(float(f1_at_k(gold.copy(), gold)[0]), 3)   # a perfect prediction
        0.87
        >>> f1_at_k(np.arange(20.0)[None], gold).round(3).tolist()  # top 10 = features 10..19
        [0.261]
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    gold_sets = np.asarray(gold, dtype=np.float64) > 0
    k = min(k, predicted.shape[1])
    top = np.argsort(-predicted, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(gold_sets, top, axis=1).sum(axis=1).astype(np.float64)
    sizes = gold_sets.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = hits / k
        recall = hits / sizes
        f1 = np.where(hits > 0, 2 * precision * recall / (precision + recall), 0.0)
    return np.where(sizes > 0, f1, np.nan)


def _rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho between corresponding rows (average ranks for ties; NaN if constant).

    Entries missing (NaN) in either row are left out of that row's correlation.
    """
    missing = np.isnan(a) | np.isnan(b)
    if missing.any():
        out = np.full(len(a), np.nan)
        for i in range(len(a)):
            keep = ~missing[i]
            if keep.sum() >= 2:
                out[i] = _rowwise_spearman(a[i : i + 1, keep], b[i : i + 1, keep])[0]
        return out
    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denominator = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=1) / denominator
    return np.where(denominator > 0, rho, np.nan)


def spearman_per_concept(predicted: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Spearman rho of each concept's predicted and gold vectors, across features.

    Examples:
        >>> spearman_per_concept(np.array([[1.0, 2.0, 3.0]]), np.array([[10.0, 20.0, 30.0]]))
        array([1.])
    """
    return _rowwise_spearman(np.asarray(predicted, float), np.asarray(gold, float))


def spearman_per_feature(predicted: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Spearman rho of each feature's predicted and gold values, across concepts."""
    return _rowwise_spearman(np.asarray(predicted, float).T, np.asarray(gold, float).T)


def neighbourhood_accuracy(
    predicted: np.ndarray,
    gold: np.ndarray,
    candidates: np.ndarray,
    k: int = 10,
) -> np.ndarray:
    """1.0 where a concept's gold vector is among the ``k`` nearest to its prediction, else 0.0.

    The ``k`` nearest are the candidate gold vectors closest (cosine) to the prediction.

    ``gold[i]`` must be one of the rows of ``candidates`` (all concepts' gold vectors). A hit
    needs fewer than ``k`` candidates *strictly* closer than g_c, so a candidate exactly as
    close (a duplicate gold vector) does not push g_c out.

    Examples:
        >>> candidates = np.eye(12)
        >>> neighbourhood_accuracy(candidates[:2], candidates[:2], candidates).tolist()
        [1.0, 1.0]
        >>> far = np.ones((1, 12)) - candidates[0]          # close to everything but itself
        >>> neighbourhood_accuracy(far, candidates[:1], candidates).tolist()
        [0.0]
    """

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)

    p, g, c = unit(predicted), unit(gold), unit(candidates)
    own = (p * g).sum(axis=1, keepdims=True)
    closer = (p @ c.T > own + 1e-12).sum(axis=1)
    return (closer < k).astype(np.float64)
