"""Every verb, listed once: the command line, the API, ``__all__`` and the report read it.

Each import below brings one verb's API function (``layers``: ``rt.layers``), built in its
experiment module from its :class:`~residual_trace.experiments.contract.Experiment` by
:func:`~residual_trace.experiments.contract.on_texts` or
:func:`~residual_trace.experiments.contract.on_model`; :data:`VERBS` lists them in the order
``trace --help`` shows them, and :data:`EXPERIMENTS` the experiments behind them. A new verb
is its import line and its name in :data:`VERBS`: a static list, so that a reader and a type
checker see every verb, and no module is imported by a name built at run time. The
experiment modules import nothing heavy, so neither does this one.

Examples:
    >>> [e.name for e in EXPERIMENTS]
    ['layers', 'decompose', 'perturb', 'probe', 'lens', 'train-lens', 'patch']
    >>> experiment("probe").inputs, experiment_of(layers) is experiment("layers")
    ('model', True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from residual_trace.errors import UserError
from residual_trace.experiments.contract import Experiment
from residual_trace.experiments.decompose import decompose as decompose
from residual_trace.experiments.layers import layers as layers
from residual_trace.experiments.lens import lens as lens
from residual_trace.experiments.patch import patch as patch
from residual_trace.experiments.perturb import perturb as perturb
from residual_trace.experiments.probe import probe as probe
from residual_trace.experiments.train_lens import train_lens as train_lens

#: Every verb's API function, in the order ``trace --help`` lists the verbs.
VERBS: tuple[Callable[..., Any], ...] = (
    layers,
    decompose,
    perturb,
    probe,
    lens,
    train_lens,
    patch,
)


def experiment_of(verb: Callable[..., Any]) -> Experiment[Any, Any]:
    """The experiment behind an API function of :data:`VERBS`."""
    found = vars(verb).get("experiment")
    if not isinstance(found, Experiment):
        raise TypeError(f"{verb!r} is not an experiment's API function")
    return found


#: Every experiment, in the order of :data:`VERBS`.
EXPERIMENTS: tuple[Experiment[Any, Any], ...] = tuple(experiment_of(v) for v in VERBS)

#: The verbs' names in ``residual_trace`` (``rt.layers``, ...).
VERB_NAMES: tuple[str, ...] = tuple(v.__name__ for v in VERBS)


def experiment(name: str) -> Experiment[Any, Any]:
    """The experiment called ``name`` (a one-line error naming the verbs otherwise)."""
    for candidate in EXPERIMENTS:
        if candidate.name == name:
            return candidate
    names = ", ".join(e.name for e in EXPERIMENTS)
    raise UserError(f"no experiment {name!r}: the experiments are {names}")
