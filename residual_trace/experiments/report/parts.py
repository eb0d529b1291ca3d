"""The parts of a report: each experiment of each model.

Each part is run through the same API call as its own command, or read back from an earlier
run's directory (resume).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from residual_trace.experiments.common import model_record
from residual_trace.experiments.options import Warn
from residual_trace.experiments.registry import EXPERIMENTS
from residual_trace.experiments.registry import experiment as registered
from residual_trace.experiments.report.config import ReportOptions, slug
from residual_trace.experiments.result import Result
from residual_trace.models import TracedModel, load_model
from residual_trace.runs import write_atomic

#: The tables of each experiment the report reads (each experiment's ``report_tables``).
READS = {e.name: e.report_tables for e in EXPERIMENTS if e.report_tables}


@dataclass
class Part:
    """One finished experiment of one model.

    It holds the tables the report reads, the model's ``run.json`` record, and (once saved)
    its directory. A part its experiment cannot run on the model (``Experiment.skip``: the
    lens of an encoder without trained head weights) has no tables and says why in
    ``skipped``.
    """

    model: str
    experiment: str
    tables: dict[str, pd.DataFrame]
    info: dict[str, Any]
    directory: Path | None = None
    ran: bool = True
    result: Result | None = field(default=None, repr=False)
    skipped: str = ""


def part_directory(root: Path, model: str, experiment: str) -> Path:
    """Where the part of ``experiment`` on ``model`` is saved under ``root``."""
    return root / "runs" / slug(model) / experiment


def _done(directory: Path, fingerprint: str) -> bool:
    marker = directory / "fingerprint.txt"
    return (
        (directory / "run.json").is_file()
        and marker.is_file()
        and marker.read_text().strip() == fingerprint
    )


def _skipped(directory: Path, fingerprint: str) -> Part | None:
    """The part an earlier run with these options left out (its reason), else ``None``."""
    marker = directory / "fingerprint.txt"
    record = directory / "skipped.json"
    if record.is_file() and marker.is_file() and marker.read_text().strip() == fingerprint:
        data = json.loads(record.read_text(encoding="utf-8"))
        return Part(data["model_name"], data["experiment"], {}, data["model"], directory,
                    ran=False, skipped=data["reason"])  # fmt: skip
    return None


def save_skipped(directory: Path, fingerprint: str, part: Part) -> None:
    """Record a left-out part, so that a resumed report does not load its model to ask again."""
    import shutil

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    data = {"model_name": part.model, "experiment": part.experiment, "reason": part.skipped,
            "model": part.info}  # fmt: skip
    write_atomic(directory / "skipped.json", json.dumps(data, indent=2) + "\n")
    write_atomic(directory / "fingerprint.txt", fingerprint + "\n")


def _left_out(
    name: str,
    experiment: str,
    model: TracedModel,
    options: Any,
    directory: Path | None,
    fingerprint: str,
) -> Part | None:
    """The part, left out and recorded, when its experiment cannot run on ``model``."""
    skip = registered(experiment).skip
    reason = skip(model, options) if skip is not None else None
    if reason is None:
        return None
    part = Part(name, experiment, {}, model_record(model), skipped=reason)
    if directory is not None:
        save_skipped(directory, fingerprint, part)
        part.directory = directory
    return part


def _read_part(model: str, experiment: str, directory: Path) -> Part:
    tables = {name: pd.read_csv(directory / f"{name}.csv") for name in READS[experiment]}
    info = json.loads((directory / "run.json").read_text())["model"]
    return Part(model, experiment, tables, info, directory, ran=False)


def run_parts(
    options: ReportOptions,
    texts: list[str],
    warn: Warn,
    workdir: Path | None = None,
    models: dict[str, TracedModel] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Part]:
    """Every experiment of every model, in order.

    With ``workdir``, each part is saved to ``workdir/runs/<model>/<experiment>/`` as soon
    as it finishes, with a fingerprint of the options it depends on, and parts already
    there with the same fingerprint are read back instead of run again (resume). Without
    it, nothing is written.
    """
    loaded = dict(models or {})
    parts = []
    for name in options.models:
        for experiment in options.experiments:
            fingerprint = options.fingerprint(name, experiment)
            directory = part_directory(workdir, name, experiment) if workdir else None
            if directory is not None and _done(directory, fingerprint):
                parts.append(_read_part(name, experiment, directory))
                continue
            left_out = _skipped(directory, fingerprint) if directory is not None else None
            if left_out is not None:
                parts.append(left_out)
                continue
            if name not in loaded:
                loaded[name] = load_model(
                    name,
                    options.device,
                    on_convert=lambda m: warn(f"note: {m}"),
                    dtype=options.dtype,
                    device_map=options.device_map,
                )
            model = loaded[name]
            if progress is not None:
                progress(f"report: {experiment} on {name}")
            # each options class runs its own experiment (`options.run`), on texts or not
            part_options: Any = options.options_for(experiment, model.n_blocks, model=name)
            left_out = _left_out(name, experiment, model, part_options, directory, fingerprint)
            if left_out is not None:
                warn(f"note: report: no {experiment} part for {name}: {left_out.skipped}")
                parts.append(left_out)
                continue
            result: Result
            if registered(experiment).inputs == "texts":
                result = part_options.run(model, texts, warn=warn)
            else:
                result = part_options.run(model, warn=warn)
            tables = {key: result.tables[key] for key in READS[experiment]}
            part = Part(name, experiment, tables, model_record(model), result=result)
            if directory is not None:
                result.save(directory, figure_format=options.figure_format, overwrite=True)
                (directory / "fingerprint.txt").write_text(fingerprint + "\n")
                part.directory = directory
            parts.append(part)
    return parts
