"""Checked by mypy (``make typecheck``), never run: the public API is typed, not ``Any``.

Each ``type: ignore[...]`` below marks a call the type checker must reject; mypy runs with
``warn_unused_ignores``, so if an API call ever lost its types (became ``Any``), the ignore
would become unused and ``make typecheck`` would fail.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

import residual_trace as rt


def usage(model: rt.TracedModel) -> None:
    layers: rt.LayersResult = rt.layers(model, ["The dog chased the cat."], batch_size=8)
    drift: pd.DataFrame = layers.tables["drift"]
    figures: dict[str, Figure] = layers.figures()
    files: list[Path] = layers.save("runs/x")
    decomposed: rt.DecomposeResult = rt.decompose(model, None, per_head=True)
    perturbed: rt.PerturbResult = rt.perturb(model, "A text.", mode="swap", swap=("dog", "cat"))
    probed: rt.ProbeResult = rt.probe(model, norms="lancaster", layers=(0, 3))
    report: rt.ReportResult = rt.report(models=("minilm",), max_texts=5)
    print(drift, figures, files, decomposed, perturbed, probed, report)

    rt.layers(model, None, batch_size="8")  # type: ignore[arg-type]
    rt.layers(model, None, no_such_option=1)  # type: ignore[call-arg]
    rt.perturb(model, None, mode="scramble")  # type: ignore[arg-type]
    rt.probe(model, folds=2.5)  # type: ignore[arg-type]
    rt.report(max_texts="5")  # type: ignore[arg-type]
    not_a_result: int = rt.decompose(model, None)  # type: ignore[assignment]
    print(not_a_result)
