"""Cross-validated probe scores for every condition, mapper and metric, as one tidy table.

Concepts are split into k folds (seeded); within each fold every mapper chooses its capacity
on the training concepts only (:mod:`residual_trace.probes.mappers`) and predicts the test
concepts. Each condition (:mod:`residual_trace.probes.controls`) draws its permutation or
random targets once per seed, so all folds of a seed see the same control.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from residual_trace.probes.controls import CONDITIONS, condition_data, fill_missing
from residual_trace.probes.mappers import fit_predict
from residual_trace.probes.metrics import (
    f1_at_k,
    neighbourhood_accuracy,
    spearman_per_concept,
    spearman_per_feature,
)
from residual_trace.probes.norms import Norms

#: Metric columns: F1@10, Spearman rho per concept, per feature, Neighbourhood Accuracy@10.
METRICS = ("f1_at_10", "spearman", "spearman_feature", "na_at_10")

SCORE_COLUMNS = ("condition", "mapper", "seed", "fold", "metric", "value", "n_test", "size")


def applicable_metrics(norms: Norms, per_feature: bool = False) -> tuple[list[str], list[str]]:
    """The metrics that mean something for these norms, and a note for each left out.

    Examples:
        >>> import numpy as np
        >>> words, dims = tuple("abcdefghijkl"), tuple("uvwxyz")
        >>> six = Norms("lancaster", words, dims, np.ones((12, 6)), sparse=False)
        >>> applicable_metrics(six)[0]
        ['spearman', 'na_at_10']
    """
    metrics: list[str] = []
    notes: list[str] = []
    n_concepts, n_features = norms.values.shape
    if norms.sparse and n_features > 10:
        metrics.append("f1_at_10")
    else:
        kind = "feature listings" if norms.sparse else "ratings"
        notes.append(
            f"F1@10 left out: {norms.name} are {kind} on {n_features} dimension(s); F1@10 "
            "ranks the top 10 of many listed features"
        )
    if n_features >= 3:
        metrics.append("spearman")
    else:
        notes.append(f"Spearman per concept left out: {n_features} feature(s) is too few to rank")
    if per_feature or n_features < 3:
        metrics.append("spearman_feature")
    if n_features >= 2 and n_concepts > 10:
        metrics.append("na_at_10")
    else:
        notes.append("Neighbourhood Accuracy@10 left out: needs 2+ features and 11+ concepts")
    return metrics, notes


def _score(
    metric: str, predicted: np.ndarray, gold: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    if metric == "f1_at_10":
        return f1_at_k(predicted, gold, k=10)
    if metric == "spearman":
        return spearman_per_concept(predicted, gold)
    if metric == "spearman_feature":
        return spearman_per_feature(predicted, gold)
    return neighbourhood_accuracy(predicted, fill_missing(gold), candidates, k=10)


def folds_of(n: int, k: int, seed: int) -> list[np.ndarray]:
    """K nearly equal test folds of a seeded permutation of ``range(n)``."""
    if k < 2 or k > n:
        raise ValueError(f"need 2 <= folds <= concepts, got {k} folds for {n} concepts")
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def evaluate(
    embeddings: np.ndarray,
    norms: Norms,
    mappers: Sequence[str] = ("plsr", "ffnn"),
    conditions: Sequence[str] = CONDITIONS,
    folds: int = 10,
    seeds: Sequence[int] = (0,),
    metrics: Sequence[str] | None = None,
    random_init: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Scores per condition x mapper x seed x fold x metric.

    Each score is the mean over the fold's test concepts (``n_test`` of them defined), with the
    capacity each fit chose (``size``).
    """
    metrics = list(metrics or applicable_metrics(norms)[0])
    categories = [norms.categories.get(c) for c in norms.concepts] if norms.categories else None
    rows = []
    for seed in seeds:
        for condition in conditions:
            rng = np.random.default_rng([seed, CONDITIONS.index(condition)])
            pair = condition_data(condition, embeddings, norms.values, rng, categories, random_init)
            if pair is None:
                continue
            inputs, targets = pair
            candidates = fill_missing(targets)
            for fold, test in enumerate(folds_of(len(targets), folds, seed)):
                train = np.setdiff1d(np.arange(len(targets)), test)
                fit_targets = fill_missing(targets[train])
                for mapper in mappers:
                    fitted = fit_predict(mapper, inputs[train], fit_targets, inputs[test], seed)
                    for metric in metrics:
                        values = _score(metric, fitted.predictions, targets[test], candidates)
                        defined = values[np.isfinite(values)]
                        rows.append(
                            (
                                condition,
                                mapper,
                                seed,
                                fold,
                                metric,
                                float(defined.mean()) if defined.size else float("nan"),
                                int(defined.size),
                                fitted.size,
                            )
                        )
                    if progress is not None:
                        progress(1)  # one fit
    return pd.DataFrame(rows, columns=list(SCORE_COLUMNS))


def summarise(scores: pd.DataFrame, keys: Sequence[str] = ()) -> pd.DataFrame:
    """Mean over folds and seeds with a 95% t-interval.

    Per ``keys`` x condition x mapper x metric: columns ``score`` (the mean), ``score_lo``,
    ``score_hi``, ``n_folds``.
    """
    group = [*keys, "condition", "mapper", "metric"]
    out = []
    for key, part in scores.groupby(group, sort=False):
        values = part["value"].dropna().to_numpy()
        mean = float(values.mean()) if values.size else float("nan")
        if values.size > 1:
            half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
        else:
            half = float("nan")
        out.append((*key, mean, mean - half, mean + half, int(values.size)))
    return pd.DataFrame(out, columns=[*group, "score", "score_lo", "score_hi", "n_folds"])


def verdicts(summary: pd.DataFrame, keys: Sequence[str] = ()) -> pd.DataFrame:
    """Whether ``system`` beats ``shuffled`` and ``nonsense``, and how far it is from ``upper``.

    Per ``keys`` x mapper x metric. ``system`` beats them when it is ahead by more than the
    intervals (its lower bound above both upper bounds); ``gap_to_upper`` = upper - system and
    ``share_of_upper`` = system / upper.
    """
    out = []
    for key, part in summary.groupby([*keys, "mapper", "metric"], sort=False):
        by = part.set_index("condition")
        if "system" not in by.index:
            continue
        system = by.loc["system"]
        controls = [c for c in ("shuffled", "nonsense") if c in by.index]
        beats = bool(controls) and all(system["score_lo"] > by.loc[c, "score_hi"] for c in controls)
        upper = float(by.loc["upper", "score"]) if "upper" in by.index else float("nan")
        out.append(
            (
                *key,
                float(system["score"]),
                beats,
                upper - float(system["score"]),
                float(system["score"]) / upper if upper else float("nan"),
            )
        )
    return pd.DataFrame(
        out,
        columns=[
            *keys,
            "mapper",
            "metric",
            "system",
            "beats_controls",
            "gap_to_upper",
            "share_of_upper",
        ],
    )
