"""Mappers from embeddings to norm vectors: PLSR, a one-hidden-layer tanh FFNN, and ridge.

Each mapper's capacity (PLSR latent components, FFNN hidden units, ridge penalty) is chosen
*inside* the training fold: the training concepts are split 80/20 (seeded), every candidate
is fitted on the 80% and scored by mean squared error on the 20%, and the choice is refitted
on the whole training fold. The test fold is never seen. PLSR and the FFNN take the *elbow*
of the validation-error curve (the point farthest below the chord from the smallest to the
largest size: more capacity beyond it buys little), ridge the penalty with the least error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from residual_trace.defaults import DEFAULT_SEED
from residual_trace.errors import UserError
from residual_trace.probes import MAPPERS as _MAPPERS

MAPPERS = _MAPPERS

PLSR_SIZES = (1, 2, 4, 8, 16, 32, 64)
FFNN_SIZES = (16, 64, 256)
RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
FFNN_EPOCHS = 200


def elbow(sizes: Sequence[float | int], errors: Sequence[float]) -> int:
    """Index of the elbow of a validation-error curve over increasing ``sizes``.

    Both axes are scaled to [0, 1] (sizes by rank, as the grids are geometric); the elbow is
    the point farthest below the chord from the first to the last point. A curve that does
    not fall (the largest size is no better than the smallest), or has not bent yet (no point
    below the chord), takes its minimum instead.

    Examples:
        >>> elbow([1, 2, 4, 8, 16], [10.0, 9.0, 2.2, 2.1, 2.0])   # flattens after 4
        2
        >>> elbow([1, 2, 4], [1.0, 2.0, 3.0])                     # rising: the minimum
        0
        >>> elbow([1, 2, 4, 8], [1.0, 0.95, 0.8, 0.3])            # still falling: the largest
        3
    """
    y = np.asarray(errors, dtype=np.float64)
    if len(y) < 3 or not np.isfinite(y).all() or y[-1] >= y[0]:
        return int(np.nanargmin(y))
    x = np.linspace(0.0, 1.0, len(y))
    scaled = (y - y.min()) / max(float(y.max() - y.min()), 1e-300)
    chord = scaled[0] + (scaled[-1] - scaled[0]) * x
    below = chord - scaled
    if below.max() <= 1e-9:  # no bend yet: the error still falls as fast as ever
        return int(np.argmin(y))
    return int(np.argmax(below))


@dataclass
class Fitted:
    """Predictions for the test rows and the capacity chosen inside the training fold."""

    predictions: np.ndarray
    size: float


def _standardise(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return tuple((x - mean) / std for x in (train, *others))


@runtime_checkable
class _Model(Protocol):
    def predict(self, x: np.ndarray) -> np.ndarray: ...


def _fit_plsr(x: np.ndarray, y: np.ndarray, size: float, seed: int) -> _Model:
    from sklearn.cross_decomposition import PLSRegression

    model = PLSRegression(n_components=int(size), scale=False, max_iter=1000)
    model.fit(x, y)
    return model


def _fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float, seed: int) -> _Model:
    from sklearn.linear_model import Ridge

    return Ridge(alpha=alpha).fit(x, y)


class _FFNN:
    """x -> tanh(x W1 + b1) W2 + b2, full-batch Adam on mean squared error (seeded)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, hidden: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.as_tensor(x, dtype=torch.float32)
        targets = torch.as_tensor(y, dtype=torch.float32)
        self.first = torch.nn.Linear(inputs.shape[1], hidden)
        self.second = torch.nn.Linear(hidden, targets.shape[1])
        for layer in (self.first, self.second):
            bound = 1.0 / np.sqrt(layer.in_features)
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
        parameters = [*self.first.parameters(), *self.second.parameters()]
        optimiser = torch.optim.Adam(parameters, lr=1e-2, weight_decay=1e-4)
        with torch.enable_grad():
            for _ in range(FFNN_EPOCHS):
                optimiser.zero_grad()
                loss = torch.nn.functional.mse_loss(self._forward(inputs), targets)
                loss.backward()
                optimiser.step()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._forward(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)


def _fit_ffnn(x: np.ndarray, y: np.ndarray, hidden: float, seed: int) -> _Model:
    return _FFNN(x, y, int(hidden), seed)


def _grid(mapper: str, n_train: int, n_inputs: int) -> list[float]:
    if mapper == "plsr":
        cap = max(1, min(n_train - 1, n_inputs))
        sizes = [s for s in PLSR_SIZES if s < cap]
        return [float(s) for s in [*sizes, min(cap, PLSR_SIZES[-1])]]
    if mapper == "ffnn":
        return [float(s) for s in FFNN_SIZES]
    return list(RIDGE_ALPHAS)


def fit_predict(
    mapper: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    seed: int = DEFAULT_SEED,
) -> Fitted:
    """Choose the mapper's capacity inside the training rows, refit, predict the test rows.

    Inputs are standardised and targets centred and scaled with the training rows'
    statistics; predictions come back in the targets' units.
    """
    if mapper not in MAPPERS:
        raise UserError(f"--mapper {mapper}: expected one of {', '.join(MAPPERS)}")
    fit: Callable[[np.ndarray, np.ndarray, float, int], _Model] = {
        "plsr": _fit_plsr,
        "ffnn": _fit_ffnn,
        "ridge": _fit_ridge,
    }[mapper]
    y_mean = y_train.mean(axis=0)
    y_std = y_train.std(axis=0)
    y_std = np.where(y_std > 1e-12, y_std, 1.0)
    targets = (y_train - y_mean) / y_std
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_train))
    cut = max(1, round(0.8 * len(order)))
    inner, held = order[:cut], order[cut:]
    grid = _grid(mapper, len(inner), x_train.shape[1])
    if len(grid) > 1 and len(held) > 0:
        xi, xh = _standardise(x_train[inner], x_train[held])
        errors = []
        for size in grid:
            model = fit(xi, targets[inner], size, seed)
            residual = model.predict(xh) - targets[held]
            errors.append(float(np.mean(residual**2)))
        chosen = grid[int(np.argmin(errors))] if mapper == "ridge" else grid[elbow(grid, errors)]
    else:
        chosen = grid[0]
    xs, xt = _standardise(x_train, x_test)
    model = fit(xs, targets, chosen, seed)
    predicted = np.asarray(model.predict(xt), dtype=np.float64)
    return Fitted(predictions=predicted * y_std + y_mean, size=chosen)
