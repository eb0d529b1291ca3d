"""The report's result and the call that makes it (see the package docstring)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from residual_trace.errors import UserError, write_fault
from residual_trace.experiments.options import Warn, python_warning
from residual_trace.experiments.report.config import EXPERIMENTS, ReportOptions, slug
from residual_trace.experiments.report.document import assemble, report_figures, write_documents
from residual_trace.experiments.report.parts import (
    Part,
    part_directory,
    run_parts,
    save_skipped,
)
from residual_trace.models import TracedModel
from residual_trace.runs import Claim, write_atomic, write_run_json

__all__ = ["EXPERIMENTS", "ReportResult", "run_report"]


@dataclass(repr=False)
class ReportResult:
    """The report: its tables, verdicts and parts, with ``figures()`` and ``save()``.

    ``tables`` are ``depth`` (one row per model x layer on a relative-depth axis), ``heads``
    (heads by verdict per model) and ``probe`` (every probe score with its controls);
    ``verdicts`` are in plain words, and ``parts`` are the experiments behind them.
    """

    options: ReportOptions
    parts: list[Part]
    tables: dict[str, pd.DataFrame]
    verdicts: list[str]
    texts: list[str] = field(default_factory=list)
    source: str = ""
    #: Each model's checkpoint directory, as the configuration check resolved it.
    directories: dict[str, str] = field(default_factory=dict)

    def figures(self) -> dict[str, Figure]:
        """The report's figures, keyed like their files in ``figures/``."""
        return {name: figure for name, _, figure in report_figures(self.options, self.tables)}

    def __repr__(self) -> str:
        return (
            f"<ReportResult on {', '.join(self.options.models)}: {len(self.texts)} text(s), "
            f"{len(self.parts)} parts; tables {', '.join(self.tables)}; "
            f"{len(self.verdicts)} verdicts>"
        )

    def describe(self) -> str:
        """The verdicts, one per line, as ``trace report`` prints them."""
        return "\n".join(f"- {line}" for line in self.verdicts)

    def save(self, out: str | Path) -> list[Path]:
        """Write the report into ``out`` and return the report's files.

        First the parts not yet on disk, then tables/, figures/, report.html (self-contained),
        report.md, run.json and config.toml.
        """
        root = Path(out)
        with Claim(root):
            try:
                return self._save(root)
            except OSError as error:
                raise write_fault(error, f"--out {root}", root) from None

    def _save(self, root: Path) -> list[Path]:
        _make_root(root)
        write_atomic(root / "config.toml", self.options.to_toml())
        for part in self.parts:
            target = part_directory(root, part.model, part.experiment)
            if part.directory is not None and part.directory.resolve() == target.resolve():
                continue
            if part.skipped:  # left out: the reason, so that a resumed report knows it
                save_skipped(target, self.options.fingerprint(part.model, part.experiment), part)
                part.directory = target
                continue
            if part.result is None:  # read back from elsewhere: its tables are all we have
                continue
            part.result.save(target, figure_format=self.options.figure_format, overwrite=True)
            (target / "fingerprint.txt").write_text(
                self.options.fingerprint(part.model, part.experiment) + "\n"
            )
            part.directory = target
        files = write_documents(root, self.options, self.parts, self.tables, self.verdicts)
        write_run_json(root / "run.json", self._record())
        parts = {part_directory(root, p.model, p.experiment) for p in self.parts}
        _prune(root, set(files), parts)
        return [*files, root / "run.json", root / "config.toml"]

    def _record(self) -> dict[str, Any]:
        return {
            "command": "report",
            "config": json.loads(json.dumps(self.options.to_dict())),
            "inputs": {"source": self.source, "n_texts": len(self.texts)},
            "parts": [
                {
                    "model": p.model,
                    "experiment": p.experiment,
                    "directory": str(p.directory) if p.directory else None,
                    "ran_now": p.ran,
                    "skipped": p.skipped or None,
                }
                for p in self.parts
            ],
            "model_dirs": {m: slug(m) for m in self.options.models},
            "checkpoints": dict(self.directories),
            "verdicts": self.verdicts,
        }


def _prune(root: Path, files: set[Path], parts: set[Path]) -> None:
    """Remove what an earlier report in ``root`` left that this one did not write.

    That is tables and figures it no longer has, and parts of models or experiments no longer
    in it.
    """
    for folder in ("tables", "figures"):
        for path in (root / folder).glob("*"):
            if path not in files:
                _remove(path)
    runs = root / "runs"
    for model in runs.glob("*") if runs.is_dir() else ():
        for experiment in model.glob("*"):
            if experiment not in parts:
                _remove(experiment)
        if model.is_dir() and not any(model.iterdir()):
            model.rmdir()


def _make_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_fault(error, f"--out {root}", root) from None


def check_report_out(root: Path, overwrite: bool = False) -> None:
    """Fail early when ``root`` cannot hold a report.

    It cannot when it is a file, unwritable, or a non-empty directory that is not an earlier
    report (which the report resumes, or with ``overwrite`` replaces).
    """
    from residual_trace.runs import check_out, check_writable, written_by

    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        if not (_is_report(root) or written_by(root) == "report"):
            raise UserError(
                f"--out {root} already holds files that are not a report: choose another --out"
            )
        check_writable(root)
        return
    check_out(root, "report", overwrite)


def _is_report(root: Path) -> bool:
    """An earlier report's directory (finished, or killed after it started)."""
    return (root / "config.toml").is_file() and (
        (root / "runs").is_dir() or (root / "run.json").is_file() or len(list(root.iterdir())) == 1
    )


def check_report_config(options: ReportOptions, warn: Warn = python_warning) -> dict[str, str]:
    """What a report needs beyond its validated options, checked before any work starts.

    Every model must be resolvable (found, without loading its weights), no checkpoint named
    twice (``./ckpt`` and ``ckpt``, ``gpt2`` and ``openai-community/gpt2``), and every probe
    norm readable. Returns each model's checkpoint directory.
    """
    from residual_trace.models.resolve import resolve
    from residual_trace.probes.norms import load_norms

    directories: dict[str, str] = {}
    for name in options.models:
        directory = str(resolve(name, on_convert=lambda m: warn(f"note: {m}")).directory)
        same = [other for other, seen in directories.items() if seen == directory]
        if same or slug(name) in {slug(other) for other in directories}:
            first = same[0] if same else next(o for o in directories if slug(o) == slug(name))
            raise UserError(
                f"--model {first} and --model {name} are the same checkpoint ({directory}): "
                "give each model once"
            )
        directories[name] = directory
    if "probe" in options.experiments:
        for spec in options.probe_norms:
            load_norms(spec)
    return directories


def _remove(path: Path) -> None:
    """Delete a file, a link or a whole directory."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _start_afresh(root: Path) -> None:
    """Remove an earlier report's files from ``root`` (``--overwrite``)."""
    for item in root.iterdir():
        _remove(item)


def run_report(
    options: ReportOptions | None = None,
    warn: Warn = python_warning,
    workdir: Path | None = None,
    models: dict[str, TracedModel] | None = None,
    progress: Warn | None = None,
    overwrite: bool = False,
) -> ReportResult:
    """Run every experiment on every model and assemble the report.

    Args:
        options: :class:`ReportOptions` (defaults when ``None``).
        warn: receives one-line warnings and notes.
        workdir: where parts are saved as they finish and read back on a rerun (a killed
            report resumes without redoing finished parts); ``None`` writes nothing.
        models: already loaded models by name (others are loaded as needed).
        progress: receives one line as each part starts.
        overwrite: remove an earlier report in ``workdir`` instead of resuming it.

    The whole configuration (texts, models, norms) is checked before anything is written.
    """
    options = options or ReportOptions()
    texts, source = options.load_texts()  # bad inputs fail before any model loads
    directories = check_report_config(options, warn)
    claim = Claim(Path(workdir)) if workdir is not None else None  # shared with the CLI's
    try:
        if workdir is not None:
            check_report_out(Path(workdir), overwrite)
            if overwrite and Path(workdir).is_dir():
                _start_afresh(Path(workdir))
            _make_root(Path(workdir))
            write_atomic(Path(workdir) / "config.toml", options.to_toml())
        parts = run_parts(options, texts, warn, workdir=workdir, models=models, progress=progress)
    except OSError as error:
        raise write_fault(error, f"--out {workdir}", workdir) from None
    finally:
        if claim is not None:
            claim.release()
    tables, verdicts = assemble(options, parts)
    return ReportResult(
        options=options,
        parts=parts,
        tables=tables,
        verdicts=verdicts,
        texts=texts,
        source=source,
        directories=directories,
    )
