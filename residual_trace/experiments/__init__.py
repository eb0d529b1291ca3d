"""Experiments: glue from a model and texts to tidy tables, figures and ``save()``.

Each verb is one module here (:mod:`.layers`, :mod:`.decompose`, :mod:`.perturb`,
:mod:`.probe`) declaring one :class:`~.contract.Experiment`: its options dataclass (defaults,
types, checks; the command line is built from it), its result class (tables in memory,
figures, ``save()``) and the functions the engines run; :mod:`.registry` lists them, and
:mod:`.report` runs them all side by side. Every experiment module imports nothing heavy
until a run starts, so the options load without torch.
"""

from __future__ import annotations

from residual_trace.experiments.common import bundled_sentences, load_inputs, read_texts

__all__ = ["bundled_sentences", "load_inputs", "read_texts"]
